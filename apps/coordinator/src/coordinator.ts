/**
 * The migration state machine, driving the two agents over HTTP:
 *
 *   checking → precopy → switchover → restoring → postcopy → done
 *        \________\___________\___________\→ aborted | failed   (before the commit point: rolled back)
 *
 * The commit point is the end of restoring: the destination runs the rebuilt process. Before it,
 * any failure or abort tells the destination to drop what it built and then the source to thaw the
 * original (in that order: never two copies running). After it, the migration ends 'done': the
 * source kills the original and the destination closes its page server.
 *
 * Post-copy and hybrid modes leave memory in the frozen original: in 'postcopy' the destination
 * pulls it (faults first, the rest in the background) and the coordinator watches that until every
 * page is home; only then is the original killed. If the pull fails for good (the destination
 * gave up reconnecting: its copy was killed rather than left reading zeros), the frozen original
 * is still whole: both sides are rolled back and it resumes on the source — 'failed', loudly, with
 * what the copy did since the switchover lost.
 *
 * Every state change is written to SQLite before the step it names starts, so a coordinator that
 * restarts finds each unfinished migration either before commit (→ roll back → 'aborted') or after
 * (→ finish the cleanup → 'done') — recover() does exactly that, retrying agents that are down.
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import {
  BUILT_MODES,
  DEFAULT_MODE,
  DEFAULT_PULL_GIVE_UP_MS,
  LAZY_MODES,
  LOST_DESTINATION_MARGIN_MS,
  isTerminal,
  type CreateMigrationRequest,
  type FailureKind,
  type HomingStatus,
  type HomingSummary,
  type HostRecord,
  type MigrationEvent,
  type MigrationEventType,
  type MigrationFailure,
  type MigrationRecord,
  type MigrationState,
  type MigrationStats,
  type PageServerAddress,
  type PageSourceStatus,
  type PrecopyRound,
  type PrecopyRoundResponse,
  type PrepareResponse,
  type SourceResponse,
  type AgentCheckResponse,
  type KernelProbe,
  type ProcessInventory,
} from '@tern/protocol';
import { createCoordinatorMetrics, type CoordinatorMetrics } from '@tern/metrics';
import { AgentCallError, AgentClient } from './agent-client.js';
import { ActiveMigrationConflict, MigrationStore, processStartTime, type Owner } from './store.js';

/** What awaitHomed concludes; `lostDestination` (why it could not be asked) when the source decided. */
type HomingVerdict = HomingStatus & { lostDestination?: string };

/** A homing status made up for a destination that cannot be asked (the source's word instead). */
function lostHoming(id: string, state: 'homed' | 'failed', detail: string): HomingStatus {
  return { id, state, detail, pendingPages: 0, lazyPages: 0, faults: 0, faultPages: 0, backgroundPages: 0, zeroPages: 0, faultP50Ms: 0, faultP99Ms: 0, elapsedMs: 0, homeMs: null, remote: null };
}

/** Coordinator instances alive in this process (several in tests, or a CLI and its embedded one). */
const liveInstances = new Set<string>();

/** An error the HTTP API answers with its status (400 bad input, 404 unknown, 409 conflict). */
export class CoordinatorError extends Error {
  override name = 'CoordinatorError';
  constructor(
    readonly statusCode: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/** A step refused or failed in a way that ends the migration with this failure. */
class MigrationFailed extends Error {
  constructor(readonly failure: Omit<MigrationFailure, 'phase'>) {
    super(failure.message);
  }
}

export interface CoordinatorOptions {
  store: MigrationStore;
  /** Bearer token the agents expect. */
  clusterToken: string;
  metrics?: CoordinatorMetrics;
  /** Timeout of the long agent calls (dump, restore). */
  longCallTimeoutMs?: number;
  /** Timeout of the other agent calls. */
  callTimeoutMs?: number;
  /** Delays between attempts to reach an agent while resolving an interrupted migration. */
  retryDelaysMs?: number[];
  log?: (msg: string) => void;
}

type Listener = (event: MigrationEvent) => void;

const MB = 1_000_000;

/**
 * Switchover cost assumed until one is measured between two hosts: beyond the last dirty pages,
 * the freeze and image dump, the image's trip through the coordinator, the restore (memory
 * follows lazily: it does not grow with the process) and the answers. Measured in the lab on the
 * 2-core development machine with a tiny last dirty set: 27-30 ms for a process without service
 * addresses; twice that as the prior. A process whose service address moves costs more (the
 * address handoff's child processes: ~200 ms today): the first migration between two hosts
 * learns it, the next ones predict with it (the store keeps it).
 */
const DEFAULT_SWITCHOVER_OVERHEAD_MS = 60;

export class Coordinator {
  readonly store: MigrationStore;
  readonly metrics: CoordinatorMetrics;
  private readonly emitter = new EventEmitter();
  private readonly running = new Map<string, Promise<void>>();
  private readonly resolving = new Map<string, Promise<void>>();
  private readonly seqs = new Map<string, number>();
  private closed = false;
  /** This instance, as recorded in the migrations it drives. */
  readonly owner: Owner = { pid: process.pid, start: processStartTime(process.pid), instance: randomBytes(8).toString('hex') };

  constructor(private readonly opts: CoordinatorOptions) {
    liveInstances.add(this.owner.instance);
    this.store = opts.store;
    this.metrics = opts.metrics ?? createCoordinatorMetrics();
    this.emitter.setMaxListeners(0);
  }

  // ---------------------------------------------------------------- hosts

  hosts(): HostRecord[] {
    return this.store.hosts();
  }

  putHost(name: string, url: string): { host: HostRecord; created: boolean } {
    const { created } = this.store.putHost({ name, url });
    return { host: { name, url }, created };
  }

  private client(name: string): AgentClient {
    const host = this.store.host(name);
    if (!host) throw new CoordinatorError(400, 'unknown-host', `unknown host ${name}`);
    return new AgentClient(host, { token: this.opts.clusterToken, timeoutMs: this.opts.callTimeoutMs ?? 30_000 });
  }

  // ---------------------------------------------------------------- events

  /** Live events of one migration (or of all, with id null). Returns the unsubscribe function. */
  subscribe(id: string | null, fn: Listener): () => void {
    const channel = id ?? '*';
    this.emitter.on(channel, fn);
    return () => this.emitter.off(channel, fn);
  }

  events(id: string, afterSeq = 0): MigrationEvent[] {
    return this.store.events(id, afterSeq);
  }

  private emit(rec: MigrationRecord, type: MigrationEventType, message: string, extra: Partial<MigrationEvent> = {}): void {
    const seq = (this.seqs.get(rec.id) ?? this.store.lastSeq(rec.id)) + 1;
    this.seqs.set(rec.id, seq);
    const event: MigrationEvent = { migrationId: rec.id, seq, at: new Date().toISOString(), type, state: rec.state, message, ...extra };
    this.store.appendEvent(event);
    this.opts.log?.(`${rec.id} ${type} ${rec.state}: ${message}`);
    this.emitter.emit(rec.id, event);
    this.emitter.emit('*', event);
  }

  // ---------------------------------------------------------------- API

  get(id: string): MigrationRecord {
    const rec = this.store.get(id);
    if (!rec) throw new CoordinatorError(404, 'not-found', `no migration ${id}`);
    return rec;
  }

  list(opts: { limit?: number; state?: MigrationState } = {}): MigrationRecord[] {
    return this.store.list(opts);
  }

  /** Validates, records ('checking') and starts a migration; its progress goes to the event stream. */
  create(req: CreateMigrationRequest): MigrationRecord {
    if (this.closed) throw new CoordinatorError(503, 'closing', 'the coordinator is shutting down');
    const mode = req.mode ?? DEFAULT_MODE;
    if (!BUILT_MODES.includes(mode)) {
      throw new CoordinatorError(400, 'mode-unavailable', `mode ${mode} is not built: this version migrates with --mode ${BUILT_MODES.join(', ')}`);
    }
    if (req.from === req.to) throw new CoordinatorError(400, 'bad-request', `from and to are the same host (${req.from})`);
    for (const h of [req.from, req.to]) {
      if (!this.store.host(h)) throw new CoordinatorError(400, 'unknown-host', `unknown host ${h} (known: ${this.hosts().map((x) => x.name).join(', ') || 'none'})`);
    }
    const busy = this.store.activeFor(req.from, req.pid) ?? this.store.activeFor(req.to, req.pid);
    if (busy) throw new CoordinatorError(409, 'conflict', `pid ${req.pid} is already part of migration ${busy.id} (${busy.from} → ${busy.to}, ${busy.state})`);
    let rec: MigrationRecord;
    try {
      rec = this.store.insert({
        id: `m${randomBytes(6).toString('hex')}`,
        from: req.from,
        to: req.to,
        pid: req.pid,
        mode,
        maxDowntimeMs: req.maxDowntimeMs ?? null,
        bandwidth: req.bandwidth ?? null,
        maxRounds: req.maxRounds ?? null,
        autoConverge: req.autoConverge ?? true,
        pullGiveUpMs: req.pullGiveUpMs ?? null,
      }, this.owner);
    } catch (err) {
      if (err instanceof ActiveMigrationConflict) throw new CoordinatorError(409, 'conflict', err.message);
      throw err;
    }
    this.metrics.migrationsInProgress.inc();
    this.emit(rec, 'phase', `migrating pid ${rec.pid} from ${rec.from} to ${rec.to} (${mode}): checking both hosts`);
    const run = this.run(rec.id).finally(() => this.running.delete(rec.id));
    this.running.set(rec.id, run);
    return rec;
  }

  /**
   * Aborts a migration before its commit point and waits (up to `waitMs`) for it to be rolled back.
   * 409 once it has committed or finished.
   */
  async abort(id: string, waitMs = 60_000): Promise<MigrationRecord> {
    const rec = this.get(id);
    if (isTerminal(rec.state)) throw new CoordinatorError(409, 'finished', `migration ${id} is already ${rec.state}`);
    if (rec.committed) throw new CoordinatorError(409, 'committed', `migration ${id} is past its commit point: the process already runs on ${rec.to}`);
    if (!rec.abortRequested) {
      this.store.requestAbort(id);
      this.emit(rec, 'log', 'abort requested');
    }
    let done = this.running.get(id) ?? this.resolving.get(id);
    if (done) {
      // Tell the agents now (the source stops a dump in progress); the runner then rolls back.
      void this.rollBack(this.get(id)).catch(() => {});
    } else {
      // Not driven here: take it over if its owner is gone, else let its owner (another process
      // over the same database) see the flag, and watch the record.
      void this.recover();
      done = this.resolving.get(id) ?? this.pollUntilFinal(id, waitMs);
    }
    await Promise.race([done, new Promise((r) => setTimeout(r, waitMs).unref())]);
    return this.get(id);
  }

  private async pollUntilFinal(id: string, waitMs: number): Promise<void> {
    const deadline = Date.now() + waitMs;
    while (!isTerminal(this.get(id).state) && Date.now() < deadline && !this.closed) await new Promise((r) => setTimeout(r, 100));
  }

  /** Resolves until every migration this instance runs or resolves is final (tests, the embedded CLI). */
  async idle(): Promise<void> {
    while (this.running.size || this.resolving.size) {
      await Promise.allSettled([...this.running.values(), ...this.resolving.values()]);
    }
  }

  /** Resolves when migration `id` is final (or this coordinator stops driving it). */
  async settled(id: string): Promise<MigrationRecord> {
    await (this.running.get(id) ?? this.resolving.get(id));
    return this.get(id);
  }

  close(): void {
    this.closed = true;
    liveInstances.delete(this.owner.instance);
  }

  // ---------------------------------------------------------------- the state machine

  private enter(id: string, state: MigrationState, message: string, phaseStart: { at: number; state: MigrationState }): MigrationRecord {
    this.metrics.phaseDurationSeconds.observe({ phase: phaseStart.state }, (performance.now() - phaseStart.at) / 1000);
    phaseStart.at = performance.now();
    phaseStart.state = state;
    const rec = this.store.setState(id, state);
    this.emit(rec, 'phase', message);
    return rec;
  }

  private abortRequested(id: string): boolean {
    return this.get(id).abortRequested;
  }

  private async run(id: string): Promise<void> {
    const started = performance.now();
    const phase = { at: started, state: 'checking' as MigrationState };
    let rec = this.get(id);
    const stats: MigrationStats = { ...rec.stats };
    const src = this.client(rec.from);
    const dst = this.client(rec.to);
    const long = this.opts.longCallTimeoutMs ?? 600_000;
    const stopIfAborted = () => {
      if (this.abortRequested(id)) throw new MigrationFailed({ kind: 'aborted', message: 'aborted on request' });
    };
    try {
      // checking: the source's verdict, then the destination's readiness and page server.
      const check = await this.step('checking', () => src.call<AgentCheckResponse>('POST', '/v1/check', { pid: rec.pid }));
      if (!check.report.movable) {
        throw new MigrationFailed({
          kind: 'not-movable',
          message: `pid ${rec.pid} on ${rec.from} cannot be moved: ${check.report.blockers.map((b) => `${b.subject}: ${b.reason}`).join('; ')}`,
          blockers: check.report.blockers,
        });
      }
      this.emit(rec, 'log', `${rec.from}: pid ${rec.pid} (${check.inventory.comm}) is movable, ${check.report.residentBytes} bytes resident`);
      const kernel = await this.step('checking', () => src.call<KernelProbe>('GET', '/v1/kernel'));
      stopIfAborted();
      const bandwidthBytesPerSec = rec.bandwidth !== null ? Math.max(1, Math.round(rec.bandwidth * MB)) : undefined;
      const prep = await this.step('checking', () =>
        dst.call<PrepareResponse>('POST', `/v1/migrations/${id}/prepare`, {
          pid: rec.pid,
          kernelRelease: kernel.kernelRelease,
          residentBytes: check.report.residentBytes,
          files: filesOf(check.inventory),
          ...(bandwidthBytesPerSec !== undefined && { bandwidthBytesPerSec }),
        }),
      );
      if (!prep.ready || !prep.pageServer) {
        throw new MigrationFailed({
          kind: 'destination-not-ready',
          message: `${rec.to} cannot take pid ${rec.pid}: ${prep.blockers.map((b) => b.reason).join('; ')}`,
          blockers: prep.blockers,
        });
      }
      this.emit(rec, 'log', `${rec.to}: ready, page server at ${prep.pageServer.address}:${prep.pageServer.port}`);
      stopIfAborted();

      let lastRound: PrecopyRound | null = null;
      const lazy = LAZY_MODES.includes(rec.mode);
      if (rec.mode === 'precopy' || rec.mode === 'hybrid') {
        // precopy: rounds while the process runs; each sends what was dirtied during the last.
        rec = this.enter(id, 'precopy', `pre-copy: sending the memory of pid ${rec.pid} while it runs`, phase);
        lastRound = await this.precopyRounds(rec, prep.pageServer, stats, bandwidthBytesPerSec, stopIfAborted);
      } else {
        // cold and post-copy have zero rounds: the memory moves inside the downtime (cold) or after
        // it, pulled by the destination (post-copy).
        const why = rec.mode === 'cold' ? 'cold mode: no pre-copy rounds, the memory moves during the switchover' : 'post-copy: no pre-copy rounds, the memory follows after the resume';
        rec = this.enter(id, 'precopy', why, phase);
        this.emit(rec, 'progress', 'pre-copy skipped', { progress: { round: 0, bytes: 0, dirtyRateBytesPerSec: null, etaSeconds: null } });
      }
      stopIfAborted();

      // switchover: freeze the source and stream its memory and state to the destination.
      rec = this.enter(
        id,
        'switchover',
        lazy
          ? `freezing pid ${rec.pid} on ${rec.from} and sending its state to ${rec.to} (its ${rec.mode === 'hybrid' ? 'last dirty pages' : 'private memory'} stay${rec.mode === 'hybrid' ? '' : 's'} on ${rec.from} until pulled)`
          : `freezing pid ${rec.pid} on ${rec.from} and sending its memory to ${rec.to}`,
        phase,
      );
      const dump = await this.step('switchover', () =>
        src.call<SourceResponse>(
          'POST',
          `/v1/migrations/${id}/source`,
          { pid: rec.pid, destination: prep.pageServer, from: rec.from, to: rec.to, ...(bandwidthBytesPerSec !== undefined && { bandwidthBytesPerSec }), ...(lazy && { lazy: true }) },
          long,
        ),
      );
      const afterDump = performance.now();
      const switchoverBytes = num(dump.transfer.wireBytes) ?? num(dump.dump.bytes) ?? 0;
      stats.bytes += switchoverBytes;
      if (rec.mode === 'precopy' || rec.mode === 'hybrid') {
        // Only the last dirty set moved inside the freeze (hybrid: except private memory's).
        stats.pages.dirty = (num(dump.dump.dataPages) ?? 0) + (num(dump.dump.zeroPages) ?? 0);
        this.metrics.bytesTotal.inc({ phase: 'switchover' }, switchoverBytes);
      } else {
        stats.pages.data = num(dump.dump.dataPages) ?? 0;
        stats.pages.zero = num(dump.dump.zeroPages) ?? 0;
      }
      const remotePages = dump.pageSource?.pages ?? 0;
      if (lazy) stats.homing = { remotePages, faultPages: 0, backgroundPages: 0, faults: 0, faultP50Ms: 0, faultP99Ms: 0, homeMs: null, reconnects: 0, pulledBytes: 0 };
      this.store.setStats(id, stats);
      const staying = dump.pageSource ? `; ${remotePages} pages stay on ${rec.from} (page source ${dump.pageSource.address}:${dump.pageSource.port})` : '';
      this.emit(rec, 'progress', `sent ${switchoverBytes} bytes in ${dump.frozenMs.toFixed(1)} ms frozen${staying}`, {
        progress: { round: stats.rounds, bytes: stats.bytes, dirtyRateBytesPerSec: null, etaSeconds: null },
      });
      stopIfAborted();

      if (dump.addresses?.length) this.emit(rec, 'log', `${rec.from} released ${dump.addresses.join(', ')}: ${rec.to} takes ${dump.addresses.length > 1 ? 'them' : 'it'} over before the restore`);

      // restoring: the destination rebuilds the process with the same pid and resumes it.
      rec = this.enter(id, 'restoring', `rebuilding pid ${rec.pid} on ${rec.to}`, phase);
      const restored = await this.step('restoring', () =>
        dst.call<{ restore: { pid: number; timings?: { memoryNs?: number; totalNs?: number }; bytesWritten?: number; lazy?: { lazyPages?: number } | null } }>(
          'POST',
          `/v1/migrations/${id}/restore`,
          {
            image: dump.image,
            addresses: dump.addresses ?? [],
            lazy: true,
            from: rec.from,
            to: rec.to,
            ...(dump.pageSource && {
              pullFrom: {
                address: dump.pageSource.address,
                port: dump.pageSource.port,
                ...(bandwidthBytesPerSec !== undefined && { bandwidthBytesPerSec }),
                ...(rec.pullGiveUpMs !== null && { giveUpAfterMs: rec.pullGiveUpMs }),
              },
            }),
          },
          long,
        ),
      );
      // Downtime without trusting two clocks: the source's own frozen time up to the end of the dump,
      // plus our monotonic time from then to the destination's answer (one network leg over).
      stats.downtimeMs = dump.frozenMs + (performance.now() - afterDump);
      if (rec.mode === 'precopy' && lastRound?.bandwidthBytesPerSec) {
        // What this switchover cost beyond its last dirty pages, remembered (in the store: a CLI's
        // embedded coordinator lives for one migration) for the next pre-copy between these hosts.
        const overhead = Math.max(0, stats.downtimeMs - (switchoverBytes / lastRound.bandwidthBytesPerSec) * 1000);
        this.store.recordSwitchoverOverhead(rec.from, rec.to, overhead);
      }
      stats.restoredPid = restored.restore.pid;
      const t = restored.restore.timings;
      const lazyPages = restored.restore.lazy?.lazyPages ?? 0;
      stats.pages.lazy = lazyPages;
      if (t?.totalNs !== undefined) {
        const lazy = lazyPages ? `; ${lazyPages} pages follow lazily, served on fault and filled in the background` : '';
        this.emit(rec, 'log', `${rec.to} rebuilt pid ${restored.restore.pid} in ${(t.totalNs / 1e6).toFixed(1)} ms (writing ${restored.restore.bytesWritten ?? 0} bytes of memory: ${((t.memoryNs ?? 0) / 1e6).toFixed(1)} ms${lazy})`);
      }

      // The commit point, atomic with the abort flag: from here on, only forward.
      if (!this.store.markCommitted(id, stats)) throw new MigrationFailed({ kind: 'aborted', message: 'aborted on request' });
      rec = this.get(id);
      this.emit(rec, 'log', `commit point passed: pid ${stats.restoredPid} runs on ${rec.to}`);

      if (lazy) {
        // postcopy: the destination pulls what stayed on the source; the original is killed only
        // once every page is home.
        rec = this.enter(id, 'postcopy', `post-copy: ${rec.to} pulls ${remotePages} pages from ${rec.from} (faults first, the rest in the background)`, phase);
        const homed = await this.awaitHomed(rec, stats);
        if (homed.state === 'failed') {
          await this.failAfterCommit(id, stats, homed, started);
          return;
        }
        rec = this.get(id);
        this.emit(rec, 'log', `every page is home on ${rec.to}: finishing on both hosts`);
        if (homed.lostDestination) {
          for (const w of await this.finishCommitted(rec, { destinationLost: true })) this.emit(rec, 'log', w);
          stats.totalMs = performance.now() - started;
          this.finishDone(id, stats, phase);
          return;
        }
      } else {
        // postcopy: nothing is fetched from the source in cold and pre-copy modes (the destination
        // fills lazily from its own store); the original is killed, the page server closed.
        rec = this.enter(
          id,
          'postcopy',
          stats.pages.lazy
            ? `finishing on both hosts; on ${rec.to} the last ${stats.pages.lazy} pages arrive from its own page store (userfaultfd), no page is fetched from ${rec.from}`
            : 'finishing on both hosts',
          phase,
        );
      }
      await this.finishCommitted(rec);
      stats.totalMs = performance.now() - started;
      this.finishDone(id, stats, phase);
    } catch (err) {
      const failure = this.failureOf(id, err);
      if (this.get(id).committed) {
        // Past the commit point the process lives on the destination whatever happens: keep
        // finishing the cleanup (retrying agents that are down) and end 'done'.
        this.emit(this.get(id), 'log', `after the commit point: ${failure.message}; finishing the cleanup`);
        await this.resolveInterrupted(id);
        return;
      }
      await this.rollBackAndRecord(id, failure, stats, started);
    }
  }

  /**
   * The pre-copy rounds, driven one call per round so that every round is a progress event: the
   * source agent starts dirty tracking, then each round sends the pages dirtied since the last
   * (round 0: all of them) and says whether to go on — the engine's convergence test (predicted
   * downtime = dirty bytes ÷ measured bandwidth + switchover cost, under --max-downtime; the dirty
   * set no longer shrinking; the round cap), with auto-converge throttling the process's CPU when
   * it dirties faster than the link carries.
   */
  private async precopyRounds(
    rec: MigrationRecord,
    destination: PageServerAddress,
    stats: MigrationStats,
    bandwidthBytesPerSec: number | undefined,
    stopIfAborted: () => void,
  ): Promise<PrecopyRound> {
    const src = this.client(rec.from);
    const long = this.opts.longCallTimeoutMs ?? 600_000;
    const path = `/v1/migrations/${rec.id}/precopy`;
    await this.step('precopy', () =>
      src.call('POST', path, {
        pid: rec.pid,
        destination,
        from: rec.from,
        to: rec.to,
        autoConverge: rec.autoConverge,
        fixedCostMs: this.store.switchoverOverhead(rec.from, rec.to) ?? DEFAULT_SWITCHOVER_OVERHEAD_MS,
        ...(rec.maxDowntimeMs !== null && { maxDowntimeMs: rec.maxDowntimeMs }),
        ...(rec.maxRounds !== null && { maxRounds: rec.maxRounds }),
        ...(bandwidthBytesPerSec !== undefined && { bandwidthBytesPerSec }),
      }),
    );
    for (;;) {
      stopIfAborted();
      const r = await this.step('precopy', () => src.call<PrecopyRoundResponse>('POST', `${path}/round`, undefined, long));
      const round = r.round;
      stats.rounds += 1;
      stats.bytes += round.bytes;
      if (round.round === 0) stats.pages.data += round.pages;
      stats.dirtyRateBytesPerSec = round.dirtyRateBytesPerSec;
      this.store.setStats(rec.id, stats);
      this.metrics.precopyRoundsTotal.inc();
      this.metrics.bytesTotal.inc({ phase: 'precopy' }, round.bytes);
      this.metrics.dirtyRateBytesPerSecond.set(round.dirtyRateBytesPerSec ?? 0);
      this.metrics.predictedDowntimeSeconds.set((round.predictedDowntimeMs ?? 0) / 1000);
      this.metrics.throttleRatio.set(r.throttlePercent / 100);
      const rate = round.dirtyRateBytesPerSec !== null ? `, dirtying ${(round.dirtyRateBytesPerSec / MB).toFixed(1)} MB/s` : '';
      const predicted = round.predictedDowntimeMs !== null ? `, predicted downtime ${round.predictedDowntimeMs.toFixed(1)} ms` : '';
      const throttle = r.throttlePercent ? `, CPU throttled ${r.throttlePercent}%` : '';
      this.emit(this.get(rec.id), 'progress', `round ${round.round}: ${round.pages} pages (${round.bytes} bytes) in ${round.elapsedMs.toFixed(1)} ms${rate}${predicted}${throttle}`, {
        progress: {
          round: round.round,
          bytes: stats.bytes,
          pages: round.pages,
          dirtyRateBytesPerSec: round.dirtyRateBytesPerSec,
          predictedDowntimeMs: round.predictedDowntimeMs,
          throttlePercent: r.throttlePercent,
          etaSeconds: round.predictedDowntimeMs !== null ? round.predictedDowntimeMs / 1000 : null,
        },
      });
      if (r.verdict !== 'continue') {
        const why = { converged: 'the predicted downtime is under the limit', 'not-shrinking': 'the dirty set stopped shrinking', 'round-cap': 'the round cap is reached' }[r.verdict];
        this.emit(this.get(rec.id), 'log', `pre-copy ends after ${stats.rounds} rounds: ${why}`);
        return round;
      }
    }
  }

  /**
   * Post-copy and hybrid, after the commit point: watches the destination pull what stayed on the
   * source until every page is home (or the fill ended otherwise), one progress event per look.
   * An unreachable destination agent is retried (the original stays frozen meanwhile).
   */
  private async awaitHomed(rec: MigrationRecord, stats: MigrationStats): Promise<HomingVerdict> {
    const dst = this.client(rec.to);
    const delays = this.opts.retryDelaysMs ?? [200, 500, 1000, 2000, 5000, 10000, 30000];
    let failures = 0;
    let lastConnection: string | null = null;
    for (;;) {
      let h: HomingStatus;
      try {
        h = await dst.call<HomingStatus>('GET', `/v1/migrations/${rec.id}/homing?waitMs=1000`, undefined, 30_000);
        failures = 0;
      } catch (err) {
        // Unreachable, or 404: the destination agent no longer knows the migration (it died and
        // restarted). Only the source can tell what became of the copy.
        if (this.closed || !(err instanceof AgentCallError)) throw err;
        const fate = await this.copyFateFromSource(rec, err.message);
        if (fate.verdict) {
          this.metrics.lostDestinationTotal.inc({ outcome: fate.verdict.state === 'failed' ? 'rolled-back' : 'finished' });
          this.emit(this.get(rec.id), 'log', `${rec.to} cannot be asked (${err.message}); ${rec.from} decided: ${fate.note}`);
          return fate.verdict;
        }
        const delay = Math.min(delays[Math.min(failures++, delays.length - 1)]!, fate.decideInMs ?? Infinity);
        this.emit(this.get(rec.id), 'log', `watching the post-copy on ${rec.to}: ${err.message}; ${fate.note}; retrying in ${delay} ms`);
        await new Promise((r) => setTimeout(r, delay));
        continue;
      }
      stats.homing = homingSummary(stats.homing?.remotePages ?? 0, h);
      this.store.setStats(rec.id, stats);
      const connection = h.remote?.state ?? null;
      if (connection !== lastConnection && connection !== null && lastConnection !== null) {
        const why = h.remote?.lastError ? ` (${h.remote.lastError})` : '';
        this.emit(this.get(rec.id), 'log', `pull connection from ${rec.to} to ${rec.from}: ${connection}${why}`);
      }
      lastConnection = connection;
      const home = h.lazyPages - h.pendingPages;
      this.emit(this.get(rec.id), 'progress', `post-copy: ${home} of ${h.lazyPages} pages home (${h.faultPages} by fault, p99 ${h.faultP99Ms.toFixed(2)} ms; ${h.backgroundPages} in the background)${connection && connection !== 'connected' ? `, connection ${connection}` : ''}`, {
        progress: {
          round: stats.rounds,
          bytes: stats.bytes + (h.remote?.bytes ?? 0),
          dirtyRateBytesPerSec: null,
          etaSeconds: null,
          pendingPages: h.pendingPages,
          faultPages: h.faultPages,
          backgroundPages: h.backgroundPages,
          faultP50Ms: h.faultP50Ms,
          faultP99Ms: h.faultP99Ms,
          ...(connection !== null && { connection }),
          reconnects: h.remote?.reconnects ?? 0,
        },
      });
      if (h.state !== 'running') {
        if (h.homeMs !== null) this.metrics.homeSeconds.observe({ mode: rec.mode }, h.homeMs / 1000);
        if (h.remote?.reconnects) this.metrics.pullReconnectsTotal.inc(h.remote.reconnects);
        stats.bytes += h.remote?.bytes ?? 0;
        if (h.remote?.bytes) this.metrics.bytesTotal.inc({ phase: 'postcopy' }, h.remote.bytes);
        this.store.setStats(rec.id, stats);
        return h;
      }
    }
  }

  /**
   * The destination cannot be asked mid post-copy: the source decides what became of the copy.
   *
   * - The source heard HOMED (every page home, acknowledged): the copy may be running on its own;
   *   the original must never resume. The migration finishes (the source kills the original).
   * - Never HOMED, and no pull connection for longer than the destination's give-up time plus a
   *   margin: the copy is dead — it killed itself when it could not pull for that long, or its
   *   agent died and the guard holding its userfaultfd killed it (it never runs on zero pages).
   *   The original resumes on the source.
   * - Otherwise (still pulling, or not silent long enough, or the source cannot be asked): wait.
   */
  private async copyFateFromSource(rec: MigrationRecord, why: string): Promise<{ verdict?: HomingVerdict; note: string; decideInMs?: number }> {
    let s: PageSourceStatus;
    try {
      s = await this.client(rec.from).call<PageSourceStatus>('GET', `/v1/migrations/${rec.id}/page-source`, undefined, 10_000);
    } catch (err) {
      return { note: `${rec.from} cannot say either (${(err as Error).message})` };
    }
    // Finished there already (a previous run of this coordinator got that far).
    if (s.state === 'committed') {
      return { verdict: { ...lostHoming(rec.id, 'homed', `${rec.from} already committed (the original is gone)`), lostDestination: why }, note: 'the source already committed' };
    }
    if (s.state === 'aborted') {
      return { verdict: { ...lostHoming(rec.id, 'failed', `${rec.from} already resumed the original`), lostDestination: why }, note: 'the source already rolled back' };
    }
    if (!s.serving) return { note: `${rec.from} serves no pages for it (${s.state})` };
    if (s.homed) {
      return {
        verdict: { ...lostHoming(rec.id, 'homed', `${rec.from} confirmed every page reached ${rec.to}`), lostDestination: why },
        note: 'the source confirmed every page home',
      };
    }
    const giveUpMs = rec.pullGiveUpMs ?? DEFAULT_PULL_GIVE_UP_MS;
    const deadAfterMs = giveUpMs + LOST_DESTINATION_MARGIN_MS;
    if (s.activeConnections > 0 || s.idleMs === null) return { note: `${rec.to} still pulls from ${rec.from}` };
    if (s.idleMs > deadAfterMs) {
      const detail = `${rec.to} is lost (${why}) and has not pulled from ${rec.from} for ${(s.idleMs / 1000).toFixed(1)} s, past its ${(giveUpMs / 1000).toFixed(1)} s give-up: its copy is dead`;
      return { verdict: { ...lostHoming(rec.id, 'failed', detail), lostDestination: why }, note: detail };
    }
    return {
      note: `no pull from ${rec.to} for ${(s.idleMs / 1000).toFixed(1)} s; its copy counts as dead after ${(deadAfterMs / 1000).toFixed(1)} s`,
      decideInMs: Math.ceil(deadAfterMs - s.idleMs) + 100,
    };
  }

  /**
   * The pull failed for good after the commit point: the destination's copy was killed (never
   * left reading zeros) and the source still holds the original frozen at the switchover. Both
   * sides roll back — the original resumes on the source — and the migration fails loudly.
   */
  private async failAfterCommit(id: string, stats: MigrationStats, homed: HomingVerdict, started: number): Promise<void> {
    const rec = this.get(id);
    const failure: MigrationFailure = {
      kind: 'engine',
      phase: 'postcopy',
      message: `post-copy failed on ${rec.to}: ${homed.detail ?? 'its memory could not be pulled'}; the copy there was killed and pid ${rec.pid} resumed on ${rec.from} from its state at the switchover (what the copy did since is lost)`,
    };
    this.emit(rec, 'log', failure.message);
    await this.rollBackAndRecord(id, failure, stats, started, { destinationLost: homed.lostDestination !== undefined });
  }

  /** Runs one agent call, turning its errors into the migration's failure. */
  private async step<T>(phase: MigrationState, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof AgentCallError) {
        if (err.unreachable || (err.status !== null && err.status >= 500)) this.metrics.agentErrorsTotal.inc({ host: err.host });
        let kind: FailureKind = 'engine';
        if (err.unreachable) kind = 'agent-unreachable';
        else if (err.status === 501 || err.code === 'unavailable') kind = 'unavailable';
        else if (err.code === 'validate' || err.code === 'inspect') kind = 'bad-input';
        else if (err.code === 'aborted') kind = 'aborted';
        throw new MigrationFailed({ kind, message: `${phase}: ${err.message}` });
      }
      throw err;
    }
  }

  private failureOf(id: string, err: unknown): MigrationFailure {
    const phase = this.get(id).state;
    if (this.abortRequested(id)) return { kind: 'aborted', phase, message: 'aborted on request' };
    if (err instanceof MigrationFailed) return { ...err.failure, phase };
    return { kind: 'internal', phase, message: err instanceof Error ? err.message : String(err) };
  }

  private finishDone(id: string, stats: MigrationStats, phase: { at: number; state: MigrationState }): void {
    this.metrics.phaseDurationSeconds.observe({ phase: phase.state }, (performance.now() - phase.at) / 1000);
    const rec = this.store.finish(id, 'done', null, stats);
    const m = this.metrics;
    m.migrationsInProgress.dec();
    m.migrationsTotal.inc({ mode: rec.mode, result: 'done' });
    if (stats.totalMs !== null) m.migrationDurationSeconds.observe({ mode: rec.mode }, stats.totalMs / 1000);
    if (stats.downtimeMs !== null) m.downtimeSeconds.observe({ mode: rec.mode }, stats.downtimeMs / 1000);
    m.migrationBytes.observe({ mode: rec.mode }, stats.bytes);
    m.migrationRounds.observe({ mode: rec.mode }, stats.rounds);
    if (rec.mode === 'cold') m.bytesTotal.inc({ phase: 'switchover' }, stats.bytes); // (pre-copy counts its bytes per round)
    m.pagesTotal.inc({ kind: 'data' }, stats.pages.data);
    m.pagesTotal.inc({ kind: 'zero' }, stats.pages.zero);
    m.pagesTotal.inc({ kind: 'dirty' }, stats.pages.dirty);
    m.pagesTotal.inc({ kind: 'lazy' }, stats.pages.lazy);
    m.dirtyRateBytesPerSecond.set(0);
    m.predictedDowntimeSeconds.set(0);
    m.throttleRatio.set(0);
    const down = stats.downtimeMs !== null ? `${stats.downtimeMs.toFixed(1)} ms downtime, ` : '';
    this.emit(rec, 'result', `done: ${down}${stats.bytes} bytes moved`, { record: rec });
  }

  private finishUndone(id: string, failure: MigrationFailure, stats: MigrationStats, started: number | null): MigrationRecord {
    const state: MigrationState = failure.kind === 'aborted' ? 'aborted' : 'failed';
    if (started !== null) stats.totalMs = performance.now() - started;
    const rec = this.store.finish(id, state, failure, stats);
    this.metrics.migrationsInProgress.dec();
    this.metrics.migrationsTotal.inc({ mode: rec.mode, result: state });
    if (stats.totalMs !== null) this.metrics.migrationDurationSeconds.observe({ mode: rec.mode }, stats.totalMs / 1000);
    const where =
      failure.kind === 'bad-input' ? '' : failure.phase === 'checking' ? `; pid ${rec.pid} keeps running on ${rec.from}` : `; pid ${rec.pid} was put back on ${rec.from}`;
    this.emit(rec, 'result', `${state}: ${failure.message}${where}`, { record: rec });
    return rec;
  }

  /**
   * Destination first (drop what it built), then the source (thaw): never two copies running.
   * `destinationLost`: the source established that the destination's copy is dead (see
   * copyFateFromSource); an unreachable destination agent is then no reason to keep the original
   * frozen.
   */
  private async rollBack(rec: MigrationRecord, opts: { destinationLost?: boolean } = {}): Promise<void> {
    const tolerate = (err: unknown) => {
      // 404: that agent holds nothing for this migration (never reached, or already forgot it).
      if (err instanceof AgentCallError && (err.status === 404 || err.status === 501)) return;
      throw err;
    };
    const tolerateLost = (err: unknown) => {
      if (opts.destinationLost && err instanceof AgentCallError && err.unreachable) {
        this.emit(this.get(rec.id), 'log', `${rec.to} unreachable (${err.message}): its copy is dead, nothing to drop there`);
        return;
      }
      tolerate(err);
    };
    await this.client(rec.to).call('POST', `/v1/migrations/${rec.id}/abort`, undefined, this.opts.longCallTimeoutMs ?? 600_000).catch(tolerateLost);
    await this.client(rec.from).call('POST', `/v1/migrations/${rec.id}/abort`, undefined, this.opts.longCallTimeoutMs ?? 600_000).catch(tolerate);
  }

  private async rollBackAndRecord(id: string, failure: MigrationFailure, stats: MigrationStats, started: number | null, opts: { destinationLost?: boolean } = {}): Promise<void> {
    try {
      await this.rollBack(this.get(id), opts);
    } catch (err) {
      // An agent we cannot reach may hold a frozen original: keep the record unfinished and retry.
      this.emit(this.get(id), 'log', `${failure.message}; rolling back failed (${(err as Error).message}): retrying`);
      this.store.setStats(id, stats);
      await this.resolveInterrupted(id, failure);
      return;
    }
    this.finishUndone(id, failure, stats, started);
  }

  /**
   * After the commit point: the source kills the original, the destination closes its page server.
   * `destinationLost`: the source confirmed every page home while the destination agent could not
   * be reached; an unreachable destination is then a warning (it has nothing left to close that
   * matters to the process), not a reason to retry forever.
   */
  private async finishCommitted(rec: MigrationRecord, opts: { destinationLost?: boolean } = {}): Promise<string[]> {
    const warnings: string[] = [];
    for (const [host, role] of [[rec.from, 'source'], [rec.to, 'destination']] as const) {
      try {
        await this.client(host).call('POST', `/v1/migrations/${rec.id}/commit`, undefined, this.opts.longCallTimeoutMs ?? 600_000);
      } catch (err) {
        if (err instanceof AgentCallError && err.status === 404) {
          warnings.push(`${role} agent ${host} no longer knows this migration (restarted?)`);
          continue;
        }
        if (role === 'destination' && opts.destinationLost && err instanceof AgentCallError && err.unreachable) {
          warnings.push(`destination agent ${host} unreachable (${err.message}); every page was home before it was lost`);
          continue;
        }
        throw err;
      }
    }
    return warnings;
  }

  // ---------------------------------------------------------------- recovery

  /** Resolves every unfinished migration left by a previous instance over the same database. */
  async recover(): Promise<void> {
    const pending = this.store.takeOverOrphans(this.owner, (instance) => liveInstances.has(instance)).filter((r) => !this.running.has(r.id));
    for (const rec of pending) {
      this.metrics.migrationsInProgress.inc();
      this.emit(rec, 'log', `coordinator restarted with this migration in ${rec.state}${rec.committed ? ' (after the commit point)' : ' (before the commit point)'}`);
    }
    await Promise.all(pending.map((rec) => this.resolveInterrupted(rec.id, undefined, true)));
  }

  /**
   * Drives an interrupted migration to a final state, retrying unreachable agents: before the commit
   * point roll back → 'aborted' (or 'failed' with the given failure); after it finish → 'done'.
   */
  private resolveInterrupted(id: string, failure?: MigrationFailure, fromRestart = false): Promise<void> {
    const existing = this.resolving.get(id);
    if (existing) return existing;
    const work = (async () => {
      const delays = this.opts.retryDelaysMs ?? [200, 500, 1000, 2000, 5000, 10000, 30000];
      for (let attempt = 0; ; attempt++) {
        const rec = this.get(id);
        if (isTerminal(rec.state)) return;
        try {
          if (rec.committed) {
            let destinationLost = false;
            if (LAZY_MODES.includes(rec.mode)) {
              // The original may still serve pages: it is killed only once they are all home.
              const stats = { ...rec.stats };
              const homed = await this.awaitHomed(rec, stats);
              if (homed.state === 'failed') {
                await this.failAfterCommit(id, stats, homed, performance.now());
                return;
              }
              destinationLost = homed.lostDestination !== undefined;
            }
            const warnings = await this.finishCommitted(rec, { destinationLost });
            for (const w of warnings) this.emit(rec, 'log', w);
            if (fromRestart) this.metrics.recoveriesTotal.inc({ result: 'done' });
            this.finishDone(id, rec.stats, { at: performance.now(), state: rec.state });
          } else {
            await this.rollBack(rec);
            const f: MigrationFailure = failure ?? {
              kind: 'aborted',
              phase: rec.state,
              message: rec.abortRequested ? 'aborted on request' : `the coordinator restarted during ${rec.state}, before the commit point: rolled back`,
            };
            if (fromRestart) this.metrics.recoveriesTotal.inc({ result: f.kind === 'aborted' ? 'aborted' : 'failed' });
            this.finishUndone(id, f, rec.stats, null);
          }
          return;
        } catch (err) {
          if (this.closed) return;
          const delay = delays[Math.min(attempt, delays.length - 1)]!;
          this.emit(rec, 'log', `resolving: ${(err as Error).message}; retrying in ${delay} ms`);
          await new Promise((r) => setTimeout(r, delay));
        }
      }
    })().finally(() => this.resolving.delete(id));
    this.resolving.set(id, work);
    return work;
  }
}

/** The migration record's summary of a destination's homing figures. */
export function homingSummary(remotePages: number, h: HomingStatus): HomingSummary {
  return {
    remotePages,
    faultPages: h.faultPages,
    backgroundPages: h.backgroundPages,
    faults: h.faults,
    faultP50Ms: h.faultP50Ms,
    faultP99Ms: h.faultP99Ms,
    homeMs: h.homeMs,
    reconnects: h.remote?.reconnects ?? 0,
    pulledBytes: h.remote?.bytes ?? 0,
  };
}

function num(v: unknown): number | undefined {
  return typeof v === 'number' && Number.isFinite(v) ? v : undefined;
}

/** The files a process maps or holds open: each must exist on the destination (same size for fds). */
export function filesOf(inv: ProcessInventory): { path: string; size?: number }[] {
  const byPath = new Map<string, { path: string; size?: number }>();
  const add = (path: string | null | undefined, size?: number) => {
    if (!path || !path.startsWith('/') || path.endsWith(' (deleted)') || path.startsWith('/proc/') || path.startsWith('/dev/')) return;
    const prev = byPath.get(path);
    byPath.set(path, size !== undefined ? { path, size } : (prev ?? { path }));
  };
  add(inv.exe);
  for (const v of inv.vmas) if (v.kind === 'file' || v.kind === 'file-shared') add(v.path);
  for (const fd of inv.fds) {
    // Sizes only for files open read-only: a file the process writes to legitimately differs.
    if (fd.kind === 'regular-file' && !fd.deleted) add(fd.path, (fd.flags & 3) === 0 ? fd.size : undefined);
    else if (fd.kind === 'directory' || fd.kind === 'fifo') add(fd.path);
  }
  return [...byPath.values()];
}
