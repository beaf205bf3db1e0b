/**
 * The agent's HTTP control API (one agent per host, running as root). app.ts builds the fastify
 * instance; server.ts listens. Every route has a JSON schema; every request but /healthz needs the
 * cluster token. The agent drives the engine only through @tern/native (see engine.ts for the exact
 * calls of the migration roles).
 *
 *   GET  /healthz                          liveness, no token
 *   GET  /metrics                          Prometheus
 *   GET  /v1/kernel                        what this kernel offers
 *   POST /v1/check                         inventory + movability verdict of a pid
 *   POST /v1/migrations/:id/prepare        destination: readiness, then a page server
 *   POST /v1/migrations/:id/precopy        source: start dirty tracking (pre-copy); the process runs
 *   POST /v1/migrations/:id/precopy/round  source: one round to the page server, the verdict, auto-converge
 *   POST /v1/migrations/:id/source         source: lock, freeze, dump (or finish the pre-copy) to the
 *                                          destination's page server, release the service addresses
 *   POST /v1/migrations/:id/restore        destination: claim the service addresses, rebuild the process
 *   GET  /v1/migrations/:id/homing         destination: how the restored process's memory is coming home
 *                                          (post-copy, hybrid; ?waitMs= waits for the end that long)
 *   GET  /v1/migrations/:id/page-source    source: the post-copy pull as the source sees it (did the
 *                                          destination confirm every page home; how long since it pulled)
 *   POST /v1/migrations/:id/commit         source: kill the original; destination: close the page server
 *   POST /v1/migrations/:id/abort          before commit: put everything back (a source whose page source
 *                                          heard "every page home" refuses: the copy may be running)
 *   GET  /v1/migrations/:id                this agent's side of a migration
 */
import { randomBytes, randomUUID } from 'node:crypto';
import Fastify, { type FastifyInstance } from 'fastify';
import { checkProcess, EngineError, probeKernel } from '@tern/native';
import { createAgentMetrics, type AgentMetrics } from '@tern/metrics';
import {
  agentMigrationStatusSchema,
  bearerAuth,
  checkRequestSchema,
  errorSchema,
  homingQuerySchema,
  migrationIdParamsSchema,
  pageSourceStatusSchema,
  precopyStartRequestSchema,
  prepareRequestSchema,
  prepareResponseSchema,
  restoreRequestSchema,
  sourceRequestSchema,
  type FreezeReport,
  type HomingStatus,
  type PageSourceStatus,
  type PrecopyRoundResponse,
  type PrecopyStartRequest,
  type PrepareRequest,
  type PrepareResponse,
  type RestoreRequest,
  type SourceRequest,
  type SourceResponse,
} from '@tern/protocol';

import type { AgentConfig } from './config.js';
import { EngineUnavailableError, isUnavailable, missingNativeFunctions, nativeMigrationEngine, UNAVAILABLE_MESSAGE, type MigrationEngine, type PageServerHandle, type ServeLazy, type SourceSessionHandle } from './engine.js';
import type { LazyStats } from '@tern/native';
import { destinationBlockers } from './readiness.js';
import { watchTcpResume } from './tcp-resume.js';
import { AgentSession, SessionTable } from './sessions.js';
import { acquireCommandSpawner } from './spawner.js';
import { AddressHandoff, NetworkLock, formatServiceAddress, guardRestore, parseServiceAddress, unguardRestore, unlockNetwork, type HandoffDetails } from './network.js';

export interface AgentApp {
  app: FastifyInstance;
  metrics: AgentMetrics;
  sessions: SessionTable;
}

export interface AgentAppOptions {
  logger?: boolean;
  /** The engine's migration roles; defaults to @tern/native's. */
  engine?: MigrationEngine;
}

/** An error with the HTTP status and machine code it is answered with. */
export class HttpError extends Error {
  constructor(
    readonly statusCode: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

const notFound = (id: string) => new HttpError(404, 'not-found', `no migration ${id} on this agent`);

type IdParams = { Params: { id: string } };

/** The protocol's view of a lazy fill (ns → ms; null stats: nothing was restored lazily). */
export function homingStatus(id: string, stats: LazyStats | null): HomingStatus {
  const ms = (ns: number) => ns / 1e6;
  if (!stats) {
    return { id, state: 'none', detail: null, pendingPages: 0, lazyPages: 0, faults: 0, faultPages: 0, backgroundPages: 0, zeroPages: 0, faultP50Ms: 0, faultP99Ms: 0, elapsedMs: 0, homeMs: null, remote: null };
  }
  const r = stats.remote;
  return {
    id,
    state: stats.state.state,
    detail: stats.state.state === 'failed' ? stats.state.detail : null,
    pendingPages: stats.pendingPages,
    lazyPages: stats.summary.lazyPages,
    faults: stats.faults,
    faultPages: stats.faultPages,
    backgroundPages: stats.backgroundPages,
    zeroPages: stats.zeroPages,
    faultP50Ms: ms(stats.faultP50Ns),
    faultP99Ms: ms(stats.faultP99Ns),
    elapsedMs: ms(stats.elapsedNs),
    homeMs: stats.homeNs === null ? null : ms(stats.homeNs),
    remote: r
      ? {
          state: r.state,
          reconnects: r.reconnects,
          disconnectedMs: ms(r.disconnectedNs),
          faultRequests: r.faultRequests,
          requestP50Ms: ms(r.requestP50Ns),
          requestP99Ms: ms(r.requestP99Ns),
          bytes: r.bytes,
          lastError: r.lastError,
        }
      : null,
  };
}

const errorResponses = { 400: errorSchema, 401: errorSchema, 404: errorSchema, 409: errorSchema, 422: errorSchema, 500: errorSchema, 501: errorSchema };

export function buildAgentApp(config: AgentConfig, opts: AgentAppOptions = {}): AgentApp {
  const app = Fastify({
    logger: opts.logger ?? false,
    // The image travels base64 in JSON: allow large bodies (pages never do, they stream engine to engine).
    bodyLimit: 512 * 1024 * 1024,
    ajv: { customOptions: { allErrors: false, removeAdditional: false, coerceTypes: false } },
  });
  // The agent's commands (ip, nft, ss, hooks) run through a small child forked now, while the
  // agent is small: forking the agent itself once it holds a page store blocks it (spawner.ts).
  // commandSpawner: false runs them directly (runCommand falls back to execFile).
  if (config.commandSpawner !== false) {
    const releaseSpawner = acquireCommandSpawner({ log: (m) => app.log.warn(m) });
    app.addHook('onClose', async () => await releaseSpawner());
  }
  const metrics = createAgentMetrics();
  const sessions = new SessionTable();
  const engine = opts.engine ?? nativeMigrationEngine();
  // With the default engine, a build without the migration glue is refused before anything is touched.
  const missing = () => (opts.engine ? [] : missingNativeFunctions());
  const handoff = new AddressHandoff({
    serviceAddresses: config.serviceAddresses ?? [],
    ...(config.addressDev !== undefined && { dev: config.addressDev }),
    ...(config.addressHook !== undefined && { hook: config.addressHook }),
  });
  const ownServiceAddresses = new Set((config.serviceAddresses ?? []).map((a) => formatServiceAddress(parseServiceAddress(a))));

  app.addHook('onRequest', bearerAuth(config.clusterToken, new Set(['/healthz'])));
  app.addHook('onResponse', async (request, reply) => {
    if (reply.statusCode >= 400) {
      metrics.requestErrorsTotal.inc({ route: request.routeOptions.url ?? 'unknown', code: String(reply.statusCode) });
    }
  });

  // Schema errors name the offending field: "body/pid must be integer".
  app.setErrorHandler(async (err: Error & { validation?: unknown; statusCode?: number }, request, reply) => {
    if (err.validation) {
      return reply.code(400).send({ error: 'bad-request', message: err.message });
    }
    if (isUnavailable(err)) {
      return reply.code(501).send({ error: 'unavailable', message: UNAVAILABLE_MESSAGE });
    }
    if (err instanceof HttpError) {
      return reply.code(err.statusCode).send({ error: err.code, message: err.message });
    }
    if (err instanceof EngineError) {
      return reply.code(422).send({ error: err.operation, message: err.message });
    }
    request.log.error(err);
    const code = err.statusCode && err.statusCode >= 400 ? err.statusCode : 500;
    return reply.code(code).send({ error: 'internal', message: err.message });
  });

  const countOp = async <T>(operation: string, fn: () => Promise<T>): Promise<T> => {
    try {
      const r = await fn();
      metrics.engineOperationsTotal.inc({ operation, outcome: 'ok' });
      return r;
    } catch (err) {
      metrics.engineOperationsTotal.inc({ operation, outcome: isUnavailable(err) ? 'unavailable' : 'error' });
      throw err;
    }
  };
  const refreshActive = () => {
    for (const role of ['source', 'destination'] as const) {
      metrics.activeSessions.set({ role }, sessions.all().filter((s) => s.role === role && s.active).length);
    }
  };

  // Processes restored lazily whose memory is still arriving (pid → their page server): a new
  // migration of such a process waits for it (its memory is registered with our userfaultfd).
  const homing = new Map<number, PageServerHandle>();
  /** Where another host reaches a server of ours bound to `bound` (every address: the one the coordinator used). */
  const reachableAddress = (bound: string, hostname: string) =>
    config.advertise ?? (bound === '0.0.0.0' || bound === '::' ? hostname.replace(/:\d+$/, '') : bound);
  /** The last figures of each homing process, so that the gauges and counters move by differences. */
  const homingSeen = new Map<number, { pending: number; reconnects: number; disconnected: boolean }>();
  const refreshHomingGauges = () => {
    let pending = 0;
    let disconnected = 0;
    for (const seen of homingSeen.values()) {
      pending += seen.pending;
      if (seen.disconnected) disconnected += 1;
    }
    metrics.lazyPendingPages.set(pending);
    metrics.pullDisconnected.set(disconnected);
  };
  /** Feeds the metrics from a lazy fill's figures (samples since the last call, reconnects since the last look). */
  const observeHoming = (pid: number, server: PageServerHandle, stats: LazyStats) => {
    for (const ns of server.lazyFaultSamples?.() ?? []) metrics.faultLatencySeconds.observe(ns / 1e9);
    const prev = homingSeen.get(pid) ?? { pending: 0, reconnects: 0, disconnected: false };
    const reconnects = stats.remote?.reconnects ?? 0;
    if (reconnects > prev.reconnects) metrics.pullReconnectsTotal.inc(reconnects - prev.reconnects);
    homingSeen.set(pid, { pending: stats.pendingPages, reconnects, disconnected: stats.remote?.state === 'reconnecting' });
    refreshHomingGauges();
  };
  const watchHoming = (id: string, pid: number, server: PageServerHandle, log: { info(m: string): void; warn(m: string): void }) => {
    homing.set(pid, server);
    // While the memory comes home: the metrics every half second (fault latency, pending pages,
    // the pull connection), then the totals once it is over.
    const poll = setInterval(() => {
      const stats = server.lazyStats?.();
      if (stats) observeHoming(pid, server, stats);
    }, 500);
    poll.unref();
    const over = () => {
      clearInterval(poll);
      if (homing.get(pid) === server) homing.delete(pid);
      homingSeen.delete(pid);
      refreshHomingGauges();
    };
    void server.lazyWait!(24 * 3600_000).then(
      (stats) => {
        if (stats) observeHoming(pid, server, stats);
        over();
        if (!stats) return;
        metrics.pagesTotal.inc({ kind: 'lazy' }, stats.faultPages + stats.backgroundPages);
        metrics.lazyPagesTotal.inc({ how: 'fault' }, stats.faultPages);
        metrics.lazyPagesTotal.inc({ how: 'background' }, stats.backgroundPages);
        if (stats.homeNs !== null && stats.homeNs !== undefined) metrics.lazyHomeSeconds.observe(stats.homeNs / 1e9);
        const state = stats.state.state === 'failed' ? `failed: ${stats.state.detail}` : stats.state.state;
        const from = stats.remote ? ` (pulled from the source: ${stats.remote.reconnects} reconnects)` : '';
        const msg = `migration ${id}: lazy memory of pid ${pid} ${state} — ${stats.faultPages} pages by fault (p50 ${(stats.faultP50Ns / 1e3).toFixed(0)} µs, p99 ${(stats.faultP99Ns / 1e3).toFixed(0)} µs), ${stats.backgroundPages} in the background${from}`;
        if (stats.state.state === 'failed') log.warn(msg);
        else log.info(msg);
      },
      (err: Error) => {
        // A failed fill (the process was killed) rejects: its figures are in lazyStats().
        const stats = server.lazyStats?.();
        if (stats) observeHoming(pid, server, stats);
        over();
        log.warn(`migration ${id}: lazy memory of pid ${pid}: ${err.message}`);
      },
    );
  };
  /** Waits (bounded) until `pid`'s lazy memory is home; throws 409 if it is not by then. */
  const settleHoming = async (pid: number) => {
    const server = homing.get(pid);
    if (!server?.lazyWait) return;
    const stats = await server.lazyWait(30_000);
    if (stats?.state.state === 'running') {
      throw new HttpError(409, 'busy', `pid ${pid} is still receiving its memory from its last migration (${stats.pendingPages} pages to go): try again shortly`);
    }
  };

  app.get(
    '/healthz',
    { schema: { response: { 200: { type: 'object', properties: { ok: { type: 'boolean' }, name: { type: 'string' } } } } } },
    async () => ({ ok: true, name: config.name }),
  );

  app.get('/metrics', async (_req, reply) => {
    reply.header('content-type', metrics.registry.contentType);
    return metrics.registry.metrics();
  });

  app.get('/v1/kernel', async () => probeKernel());

  app.post<{ Body: { pid: number } }>(
    '/v1/check',
    { schema: { body: checkRequestSchema, response: { 400: errorSchema, 401: errorSchema, 422: errorSchema } } },
    async (request) => {
      try {
        const result = await checkProcess(request.body.pid);
        metrics.engineOperationsTotal.inc({ operation: 'check', outcome: result.report.movable ? 'movable' : 'not-movable' });
        return result;
      } catch (err) {
        metrics.engineOperationsTotal.inc({ operation: 'check', outcome: 'error' });
        throw err;
      }
    },
  );

  // ---------------------------------------------------------------- destination role

  app.post<IdParams & { Body: PrepareRequest }>(
    '/v1/migrations/:id/prepare',
    { schema: { params: migrationIdParamsSchema, body: prepareRequestSchema, response: { 200: prepareResponseSchema, ...errorResponses } } },
    async (request): Promise<PrepareResponse> => {
      const { id } = request.params;
      if (sessions.get(id)) throw new HttpError(409, 'conflict', `migration ${id} already has a session on this agent`);
      const blockers = destinationBlockers(request.body);
      if (blockers.length) {
        metrics.engineOperationsTotal.inc({ operation: 'prepare', outcome: 'not-ready' });
        return { id, ready: false, blockers, pageServer: null };
      }
      if (missing().length) throw new EngineUnavailableError(missing());
      const session = new AgentSession(id, 'destination', request.body.pid, 'prepared');
      sessions.add(session); // before the await: a concurrent second prepare gets 409
      // The page stream's own credentials: a 128-bit id (the engine's framing carries 32 hex digits)
      // and a 256-bit token, fresh for every migration.
      const pageId = randomUUID().replace(/-/g, '');
      const token = randomBytes(32).toString('hex');
      try {
        session.pageServer = await countOp('prepare', () =>
          engine.startPageServer({ address: config.listen, port: 0, migrationId: pageId, token }),
        );
      } catch (err) {
        sessions.delete(id);
        throw err;
      }
      refreshActive();
      if (ownServiceAddresses.size) {
        // Before the restore claims them: see guardRestore (removed after the restore or by abort).
        await guardRestore(id, [...ownServiceAddresses]).catch((err: Error) => request.log.warn(`restore guard: ${err.message}`));
      }
      const server = session.pageServer;
      session.pageCredentials = { migrationId: pageId, token: server.token ?? token };
      const address = reachableAddress(server.address, request.hostname);
      return { id, ready: true, blockers: [], pageServer: { address, port: server.port, ...session.pageCredentials } };
    },
  );

  app.post<IdParams & { Body: RestoreRequest }>(
    '/v1/migrations/:id/restore',
    { schema: { params: migrationIdParamsSchema, body: restoreRequestSchema, response: errorResponses } },
    async (request) => {
      const received = performance.now();
      const { id } = request.params;
      const session = sessions.get(id);
      if (!session || session.role !== 'destination') throw notFound(id);
      if (session.state !== 'prepared') throw new HttpError(409, 'conflict', `migration ${id} is ${session.state} here, not prepared`);
      const server = session.pageServer;
      if (!server) throw new HttpError(409, 'conflict', `migration ${id} has no page server here`);
      const addresses = (request.body.addresses ?? []).map((a) => {
        try {
          return formatServiceAddress(parseServiceAddress(a));
        } catch (err) {
          throw new HttpError(400, 'bad-request', `body/addresses: ${(err as Error).message}`);
        }
      });
      // Only addresses this host is configured to serve may be put on it (a hook decides for itself).
      const foreign = config.addressHook ? [] : addresses.filter((a) => !ownServiceAddresses.has(a));
      if (foreign.length) {
        throw new HttpError(422, 'address-handoff', `${foreign.join(', ')} ${foreign.length > 1 ? 'are' : 'is'} not among this host's service addresses (${[...ownServiceAddresses].join(', ') || 'none configured'})`);
      }
      session.set('restoring');
      const image = Buffer.from(request.body.image, 'base64');
      const details: HandoffDetails = { migrationId: id, pid: session.pid, from: request.body.from ?? '', to: request.body.to ?? config.name };
      const call = countOp('restore', async () => {
        try {
          if (addresses.length || config.addressHook) {
            // No RST for a peer whose segment arrives before its socket is rebuilt (network.ts);
            // this host's own service addresses are guarded from prepare on, out of the downtime.
            const unguarded = addresses.filter((a) => !ownServiceAddresses.has(a));
            if (unguarded.length) await guardRestore(id, unguarded);
            // Recorded before the claim: a claim that fails half-way is still given back by undo().
            session.handoff = { addresses, giveBack: () => handoff.release(addresses, 'destination', details) };
            try {
              await handoff.claim(addresses, 'destination', details);
            } catch (err) {
              throw new HttpError(422, 'address-handoff', (err as Error).message);
            }
          }
          const called = performance.now();
          const pull = request.body.pullFrom;
          const remote = pull && session.pageCredentials ? { ...pull, ...session.pageCredentials } : undefined;
          const report = await engine.restore(image, server, { lazy: request.body.lazy === true || remote !== undefined, ...(remote && { remote }) });
          const returned = performance.now();
          // Every step of the engine's rebuild (ms), so that a slow restore says which step was slow.
          const { totalNs, remoteSyscalls, remoteRoundTrips, ...steps } = report.timings;
          const breakdown = Object.entries(steps)
            .filter(([, v]) => typeof v === 'number')
            .map(([k, v]) => `${k.replace(/Ns$/, '')} ${((v as number) / 1e6).toFixed(2)}`)
            .join(', ');
          const syscalls = remoteSyscalls === undefined ? '' : `; ${remoteSyscalls} remote syscalls in ${remoteRoundTrips ?? 0} ptrace round trips`;
          request.log.info(`migration ${id}: restore call ${(returned - called).toFixed(1)} ms, engine ${(totalNs / 1e6).toFixed(1)} ms (${breakdown}${syscalls}), since the request ${(returned - received).toFixed(1)} ms, image ${image.length} bytes`);
          // The sockets exist: the guard goes, but not inside the downtime. Not from here: nft is a
          // child process, and spawning it forks this agent (page tables of every page it holds, a
          // gigabyte and more after a pre-copy) synchronously, tens of ms before the answer could
          // leave. It goes once the answer is out (below), or before the 409 of an abort.
          return report;
        } catch (err) {
          await unguardRestore(id).catch(() => {});
          throw err;
        }
      });
      session.inFlight = call;
      try {
        const report = await call;
        if (session.is('aborting')) {
          // Aborted while restoring: the abort route waits for us and then kills what we built.
          void unguardRestore(id).catch(() => {});
          session.restoredPid = report.pid;
          throw new HttpError(409, 'aborted', `migration ${id} was aborted during restore`);
        }
        session.restoredPid = report.pid;
        session.set('restored');
        metrics.restoreSeconds.observe(report.timings.totalNs / 1e9);
        // Watchers of what follows the resume, started once the answer is on its way: spawning ss
        // or queueing a Neon task here would sit inside the downtime the coordinator measures.
        const resumedAt = performance.now();
        setImmediate(() => {
          // The answer that ends the downtime is in the socket now: the lazy fill's background copy
          // may start (the engine held it so as not to compete with this answer for the CPU; it
          // would start by itself shortly anyway). Faults were served all along.
          try {
            if (report.lazy) server.lazyRelease?.();
          } catch (err) {
            // An engine without the call: it releases by itself after its delay.
            request.log.warn(`migration ${id}: releasing the lazy fill: ${(err as Error).message}`);
          }
          request.log.info(`migration ${id}: answer handed to the socket ${(performance.now() - resumedAt).toFixed(1)} ms after the engine returned`);
          void unguardRestore(id).catch(() => {});
          if (report.lazy && server.lazyWait) watchHoming(id, report.pid, server, request.log);
          // How long the restored connections wait for their peers (tcp-resume.ts).
          void watchTcpResume(report.pid, resumedAt).then((r) => {
            for (const d of r.delaysSeconds) metrics.tcpResumeDelaySeconds.observe(d);
            metrics.tcpIdleConnectionsTotal.inc(r.idle);
            if (r.connections) {
              const max = Math.max(0, ...r.delaysSeconds) * 1000;
              request.log.info(`migration ${id}: ${r.delaysSeconds.length} of ${r.connections} restored connections heard from their peers, the last after ${max.toFixed(1)} ms; ${r.idle} idle`);
            }
          }, () => {});
        });
        const stats = server.stats?.();
        if (stats) {
          metrics.pageBytesTotal.inc({ direction: 'received' }, stats.wireBytes);
          metrics.pagesTotal.inc({ kind: 'data' }, stats.dataPages);
          metrics.pagesTotal.inc({ kind: 'zero' }, stats.zeroPages);
        }
        return { id, restore: report };
      } catch (err) {
        if (session.is('restoring')) session.set('failed', (err as Error).message);
        throw err;
      } finally {
        session.inFlight = null;
      }
    },
  );

  // ---------------------------------------------------------------- source role

  app.post<IdParams & { Body: SourceRequest }>(
    '/v1/migrations/:id/source',
    { schema: { params: migrationIdParamsSchema, body: sourceRequestSchema, response: errorResponses } },
    async (request): Promise<SourceResponse> => {
      const { id } = request.params;
      const { pid, destination, bandwidthBytesPerSec } = request.body;
      const details: HandoffDetails = { migrationId: id, pid, from: request.body.from ?? config.name, to: request.body.to ?? '' };
      // After pre-copy rounds the session exists already: the switchover finishes it.
      const existing = sessions.get(id);
      const precopy = existing?.role === 'source' && existing.pid === pid && existing.is('precopy') ? existing.precopy : null;
      if (existing && !precopy) throw new HttpError(409, 'conflict', `migration ${id} already has a session on this agent (${existing.role}, ${existing.state})`);
      if (!precopy && missing().length) throw new EngineUnavailableError(missing());
      if (!precopy) await settleHoming(pid);
      const session = existing ?? new AgentSession(id, 'source', pid, 'freezing');
      if (existing) session.set('freezing');
      else sessions.add(session);
      refreshActive();
      const pageDestination = { ...destination, ...(bandwidthBytesPerSec !== undefined && { bandwidthBytesPerSec }) };
      // Post-copy / hybrid: what stays in the frozen original is served from a page source here.
      const serveLazy: ServeLazy | undefined = request.body.lazy ? { address: config.listen } : undefined;
      const work = (async () => {
        // Network lock (network.ts): the process's TCP connections go silent here until commit
        // or rollback, so the source kernel neither ACKs nor resets while they move.
        const lock = new NetworkLock(id, pid);
        // Which service addresses go with the process: looked up before the freeze, out of the downtime.
        const addresses = await handoff.addressesOf(pid);
        let freeze: FreezeReport;
        let out: Awaited<ReturnType<SourceSessionHandle['dump']>>;
        if (precopy) {
          await lock.lock();
          // A throttled process answers the freeze only when its quota lets it run (up to a cfs
          // period, 100 ms): give it its full share back right before the final freeze (one write
          // of the quota), and move it out of our cgroup after.
          if (session.throttle?.current()) await session.throttle.setPercent(0).catch(() => null);
          session.frozenAt = process.hrtime.bigint();
          session.set('dumping');
          // Freeze, last dirty set, image — one engine call; the throttle is no longer needed.
          const finished = await countOp('precopy-finish', () => precopy.finish(pageDestination, serveLazy));
          if (finished.timings) {
            const steps = Object.entries(finished.timings).map(([k, v]) => `${k.replace(/Ns$/, '')} ${(v / 1e6).toFixed(1)}`).join(', ');
            request.log.info(`migration ${id}: final freeze ${((finished.frozenNs ?? 0) / 1e6).toFixed(1)} ms (${steps} ms)`);
          }
          session.source = {
            freeze: async () => finished.freeze!,
            dump: async () => finished,
            commit: () => precopy.commit(),
            abort: () => precopy.abort(),
            pageSourceStats: () => precopy.pageSourceStats?.() ?? null,
          };
          session.precopy = null;
          await session.releaseThrottle();
          await lock.extend();
          freeze = finished.freeze ?? { threads: [], elapsedNs: 0 };
          out = finished;
        } else {
          const handle = await countOp('open', () => engine.openSource(pid));
          session.source = handle;
          if (session.is('aborting')) throw new HttpError(409, 'aborted', `migration ${id} was aborted`);
          await lock.lock();
          session.frozenAt = process.hrtime.bigint();
          freeze = await countOp('freeze', () => handle.freeze());
          // Connections accepted between the lock and the freeze: the process is stopped, the set is final.
          await lock.extend();
          if (session.is('aborting')) throw new HttpError(409, 'aborted', `migration ${id} was aborted`);
          session.set('dumping');
          out = await countOp('dump', () => handle.dump(pageDestination, serveLazy));
        }
        const frozenMs = Number(process.hrtime.bigint() - session.frozenAt!) / 1e6;
        if (session.is('aborting')) throw new HttpError(409, 'aborted', `migration ${id} was aborted`);
        const result = Buffer.isBuffer(out) ? { image: out } : out;
        // Address handoff: the service addresses the original serves on leave this host now; the
        // destination claims them before it restores (its sockets are bound to them).
        if (addresses.length || config.addressHook) {
          session.handoff = { addresses, giveBack: () => handoff.claim(addresses, 'source', details) };
          try {
            await handoff.release(addresses, 'source', details);
          } catch (err) {
            throw new HttpError(422, 'address-handoff', (err as Error).message);
          }
        }
        if (session.is('aborting')) throw new HttpError(409, 'aborted', `migration ${id} was aborted`);
        session.set('dumped');
        if (result.transfer) metrics.pageBytesTotal.inc({ direction: 'sent' }, result.transfer.wireBytes);
        const source = 'pageSource' in result ? result.pageSource : null;
        const pageSource = source ? { address: reachableAddress(source.address, request.hostname), port: source.port, pages: source.pages } : null;
        if (pageSource) request.log.info(`migration ${id}: ${pageSource.pages} pages stay here, served on ${pageSource.address}:${pageSource.port} until commit`);
        return {
          id,
          image: result.image.toString('base64'),
          freeze,
          frozenMs,
          dump: { ...(result.dump ?? {}) },
          transfer: { ...(result.transfer ?? {}) },
          addresses,
          pageSource,
        } satisfies SourceResponse;
      })();
      session.inFlight = work;
      try {
        return await work;
      } catch (err) {
        if (isUnavailable(err) && !session.source) {
          sessions.delete(id); // nothing was touched: no trace of this migration
          await unlockNetwork(id).catch(() => {});
          refreshActive();
          throw err;
        }
        if (!session.is('aborting', 'aborted')) {
          // Before the commit point any failure puts the original back exactly as it was.
          session.set('aborting', (err as Error).message);
          try {
            await session.undo();
            session.set('failed');
          } catch (undoErr) {
            session.set('failed', `${(err as Error).message}; and putting the original back failed: ${(undoErr as Error).message}`);
          }
          await unlockNetwork(id).catch(() => {});
          metrics.migrationRolesTotal.inc({ role: 'source', outcome: 'failed' });
          refreshActive();
        }
        throw err;
      } finally {
        session.inFlight = null;
      }
    },
  );

  // ---------------------------------------------------------------- source role: pre-copy

  app.post<IdParams & { Body: PrecopyStartRequest }>(
    '/v1/migrations/:id/precopy',
    { schema: { params: migrationIdParamsSchema, body: precopyStartRequestSchema, response: errorResponses } },
    async (request) => {
      const { id } = request.params;
      const body = request.body;
      if (sessions.get(id)) throw new HttpError(409, 'conflict', `migration ${id} already has a session on this agent`);
      await settleHoming(body.pid);
      const session = new AgentSession(id, 'source', body.pid, 'precopy');
      session.precopyOptions = body;
      sessions.add(session);
      refreshActive();
      try {
        session.precopy = await countOp('precopy-start', () => engine.openPrecopy(body.pid, body.fixedCostMs !== undefined ? { fixedCostMs: body.fixedCostMs } : {}));
      } catch (err) {
        sessions.delete(id); // nothing is left in the process: no trace of this migration
        refreshActive();
        throw err;
      }
      return session.status();
    },
  );

  app.post<IdParams>(
    '/v1/migrations/:id/precopy/round',
    { schema: { params: migrationIdParamsSchema, response: errorResponses } },
    async (request): Promise<PrecopyRoundResponse> => {
      const { id } = request.params;
      const session = sessions.get(id);
      if (!session || session.role !== 'source') throw notFound(id);
      const precopy = session.precopy;
      const opts = session.precopyOptions;
      if (!session.is('precopy') || !precopy || !opts) throw new HttpError(409, 'conflict', `migration ${id} is ${session.state} here, not in pre-copy`);
      if (session.inFlight) throw new HttpError(409, 'conflict', `migration ${id} already runs a round`);
      const work = (async () => {
        const destination = { ...opts.destination, ...(opts.bandwidthBytesPerSec !== undefined && { bandwidthBytesPerSec: opts.bandwidthBytesPerSec }) };
        const round = await countOp('precopy-round', () => precopy.round(destination));
        metrics.pageBytesTotal.inc({ direction: 'sent' }, round.bytes);
        let verdict = await precopy.decide({
          ...(opts.maxDowntimeMs !== undefined && { maxDowntimeMs: opts.maxDowntimeMs }),
          ...(opts.maxRounds !== undefined && { maxRounds: opts.maxRounds }),
        });
        // Auto-converge (QEMU's rule of thumb): the process dirties more than half of what the link
        // carries, so the rounds chase it — take CPU from it, one step per round, and keep going
        // while a step is left.
        const outruns = round.round > 0 && round.dirtyRateBytesPerSec !== null && round.bandwidthBytesPerSec !== null && round.dirtyRateBytesPerSec > 0.5 * round.bandwidthBytesPerSec;
        if (opts.autoConverge !== false && outruns && (verdict === 'not-shrinking' || verdict === 'continue')) {
          const stepped = await session.throttleStep();
          if (stepped && verdict === 'not-shrinking') verdict = 'continue';
        }
        return { id, round, verdict, throttlePercent: session.throttle?.current()?.percentOff ?? 0 } satisfies PrecopyRoundResponse;
      })();
      session.inFlight = work;
      try {
        return await work;
      } catch (err) {
        if (session.is('precopy')) {
          // A failed round ends the pre-copy: tracking off, throttle gone, the process as it was.
          session.set('aborting', (err as Error).message);
          await session.undo().catch(() => {});
          session.set('failed');
          refreshActive();
        }
        throw err;
      } finally {
        session.inFlight = null;
      }
    },
  );

  // ---------------------------------------------------------------- both roles

  app.post<IdParams>(
    '/v1/migrations/:id/commit',
    { schema: { params: migrationIdParamsSchema, response: errorResponses } },
    async (request) => {
      const { id } = request.params;
      const session = sessions.get(id);
      if (!session) throw notFound(id);
      if (session.state === 'committed') return session.status(); // retried after a lost answer
      const ready = session.role === 'source' ? 'dumped' : 'restored';
      if (session.state !== ready) throw new HttpError(409, 'conflict', `migration ${id} is ${session.state} here: commit needs ${ready}`);
      await countOp('commit', async () => {
        if (session.role === 'source') {
          // Post-copy: what the destination pulled from the original before it is killed.
          const served = session.source!.pageSourceStats?.();
          if (served) {
            metrics.pageBytesTotal.inc({ direction: 'sent' }, served.bytes);
            request.log.info(`migration ${id}: the page source served ${served.pages} pages in ${served.requests} requests over ${served.connections} connections`);
          }
          await session.source!.commit();
          await unlockNetwork(id);
          if (session.frozenAt !== null) metrics.freezeSeconds.observe({ role: 'source' }, Number(process.hrtime.bigint() - session.frozenAt) / 1e9);
          await session.source!.close?.();
        } else {
          await session.pageServer?.close();
          await unguardRestore(id).catch(() => {});
        }
      });
      session.set('committed');
      metrics.migrationRolesTotal.inc({ role: session.role, outcome: 'committed' });
      refreshActive();
      return session.status();
    },
  );

  app.post<IdParams>(
    '/v1/migrations/:id/abort',
    { schema: { params: migrationIdParamsSchema, response: errorResponses } },
    async (request) => {
      const { id } = request.params;
      const session = sessions.get(id);
      if (!session) throw notFound(id);
      if (session.state === 'committed') throw new HttpError(409, 'committed', `migration ${id} is past the commit point here: it cannot be aborted`);
      if (session.state === 'aborted') return session.status();
      if (session.role === 'source' && session.source?.pageSourceStats?.()?.homed) {
        // The destination confirmed every page home: its copy may be running on its own. Resuming
        // the original now would run the process twice.
        throw new HttpError(409, 'homed', `migration ${id}: the destination confirmed every page home; the original on this host must not resume (commit instead)`);
      }
      const wasFailed = session.state === 'failed';
      session.set('aborting');
      // A source engine call in flight is told to stop at once (the engine cancels the dump and
      // thaws); either way we wait for the call to settle before we answer.
      const pending = session.inFlight;
      if (pending) {
        if (session.role === 'source' && session.source) await session.undo().catch(() => {});
        await pending.catch(() => {});
      }
      await countOp('abort', () => session.undo());
      await unlockNetwork(id).catch(() => {});
      await unguardRestore(id).catch(() => {});
      session.set('aborted');
      if (!wasFailed) metrics.migrationRolesTotal.inc({ role: session.role, outcome: 'aborted' });
      if (session.frozenAt !== null) metrics.freezeSeconds.observe({ role: 'source' }, Number(process.hrtime.bigint() - session.frozenAt) / 1e9);
      refreshActive();
      return session.status();
    },
  );

  app.get<IdParams & { Querystring: { waitMs?: string } }>(
    '/v1/migrations/:id/homing',
    { schema: { params: migrationIdParamsSchema, querystring: homingQuerySchema, response: errorResponses } },
    async (request): Promise<HomingStatus> => {
      const { id } = request.params;
      const session = sessions.get(id);
      if (!session || session.role !== 'destination') throw notFound(id);
      const server = session.pageServer;
      let stats = server?.lazyStats?.() ?? null;
      const waitMs = Number(request.query.waitMs ?? 0);
      if (stats?.state.state === 'running' && waitMs > 0 && server?.lazyWait) {
        // Ends early when the fill ends; a timeout or a failure just means "look at the figures".
        await server.lazyWait(waitMs).catch(() => null);
        stats = server.lazyStats?.() ?? stats;
      }
      return homingStatus(id, stats);
    },
  );

  app.get<IdParams>(
    '/v1/migrations/:id/page-source',
    { schema: { params: migrationIdParamsSchema, response: { 200: pageSourceStatusSchema, ...errorResponses } } },
    async (request): Promise<PageSourceStatus> => {
      const { id } = request.params;
      const session = sessions.get(id);
      if (!session || session.role !== 'source') throw notFound(id);
      const s = session.source?.pageSourceStats?.() ?? null;
      const state = session.state;
      if (!s) return { id, state, serving: false, homed: false, activeConnections: 0, idleMs: null, connections: 0, pages: 0, bytes: 0 };
      return { id, state, serving: true, homed: s.homed, activeConnections: s.activeConnections, idleMs: s.idleMs, connections: s.connections, pages: s.pages, bytes: s.bytes };
    },
  );

  app.get<IdParams>(
    '/v1/migrations/:id',
    { schema: { params: migrationIdParamsSchema, response: { 200: agentMigrationStatusSchema, ...errorResponses } } },
    async (request) => {
      const session = sessions.get(request.params.id);
      if (!session) throw notFound(request.params.id);
      return session.status();
    },
  );

  return { app, metrics, sessions };
}
