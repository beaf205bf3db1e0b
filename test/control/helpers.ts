/**
 * Plumbing for the control-plane tests: coordinators over temp SQLite files, real agents on loopback,
 * and — for the state machine, whose engine glue is not built yet — scripted stand-ins for agents that
 * speak the agent API over real HTTP (test doubles only: product code has no fake engine).
 */
import Fastify, { type FastifyInstance } from 'fastify';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import { buildAgentApp } from '@tern/agent';
import { buildCoordinatorApp, type CoordinatorApp } from '@tern/coordinator';
import type { HostRecord } from '@tern/protocol';

export const token = 'test-cluster-token-0123456789';
export const auth = { authorization: `Bearer ${token}` };

interface Teardownable {
  teardown(fn: () => unknown): void;
}

export function tempDir(t: Teardownable, prefix = 'tern-ctl-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export function urlOf(app: FastifyInstance): string {
  const a = app.server.address() as AddressInfo;
  return `http://127.0.0.1:${a.port}`;
}

/** A real agent (the product's app) listening on 127.0.0.1, port chosen by the kernel. */
export async function realAgent(t: Teardownable, name: string) {
  const agent = buildAgentApp({ name, listen: '127.0.0.1', port: 0, clusterToken: token });
  const calls: string[] = [];
  agent.app.addHook('onRequest', async (req) => {
    calls.push(`${req.method} ${req.url}`);
  });
  await agent.app.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => agent.app.close());
  return { ...agent, calls, url: urlOf(agent.app), host: { name, url: urlOf(agent.app) } as HostRecord };
}

/** A coordinator app over `database`, with fast retries; closed at teardown. */
export function coordinatorOn(t: Teardownable, database: string, hosts: HostRecord[], opts: { listen?: boolean } = {}): CoordinatorApp & { listening: Promise<string> } {
  const c = buildCoordinatorApp(
    { listen: '127.0.0.1', port: 0, clusterToken: token, apiToken: token, database, hosts },
    { recoveryWaitMs: 5000, coordinator: { retryDelaysMs: [50, 100, 200] } },
  );
  t.teardown(() => c.app.close());
  const listening = opts.listen ? c.app.listen({ host: '127.0.0.1', port: 0 }).then(() => urlOf(c.app)) : Promise.resolve(c.app.ready()).then(() => '');
  return { ...c, listening };
}

export type Step = 'check' | 'kernel' | 'prepare' | 'precopy' | 'round' | 'source' | 'restore' | 'homing' | 'page-source' | 'commit' | 'abort';

export interface FakeAgentScript {
  /** Steps answered with an error: status and machine code. */
  fail?: Partial<Record<Step, { status: number; error: string; message?: string }>>;
  /** Steps that take this long (ms) before answering. */
  delay?: Partial<Record<Step, number>>;
  movable?: boolean;
  /** Pre-copy: the verdict of each round in turn (then 'converged'). */
  verdicts?: string[];
  /**
   * Post-copy: the homing states answered in turn (then the last one again); default running,
   * homed. 'lost': the agent is gone from then on (every call meets a destroyed connection).
   */
  homing?: ('running' | 'reconnecting' | 'homed' | 'failed' | 'lost')[];
  /** Source: the page source's answers in turn (then the last one again); default still pulling. */
  pageSource?: { homed: boolean; idleMs: number | null }[];
}

/**
 * A stand-in agent: the agent API's routes, answering like an engine that works (or fails where the
 * script says), and recording every call in order.
 */
export async function fakeAgent(t: Teardownable, name: string, script: FakeAgentScript = {}) {
  const app = Fastify();
  const calls: { step: Step; id?: string; body?: unknown }[] = [];
  const state = new Map<string, string>();
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
  let lost = false;
  app.addHook('onRequest', async (req, reply) => {
    if (!lost) return;
    // A dead agent: no answer at all, the connection just goes away.
    reply.hijack();
    req.raw.socket.destroy();
  });
  const answer = async (step: Step, id: string | undefined, body: unknown, reply: { code(n: number): { send(b: unknown): unknown } }, ok: () => unknown) => {
    calls.push({ step, ...(id !== undefined && { id }), ...(body !== undefined && { body }) });
    if (script.delay?.[step]) await sleep(script.delay[step]!);
    const f = script.fail?.[step];
    if (f) return reply.code(f.status).send({ error: f.error, message: f.message ?? `${step} failed (scripted)` });
    return ok();
  };
  app.post<{ Body: { pid: number } }>('/v1/check', async (req, reply) =>
    answer('check', undefined, req.body, reply, () => ({
      inventory: { pid: req.body.pid, nsPid: req.body.pid, comm: 'fake', exe: null, cmdline: [], vmas: [], fds: [], threads: [] },
      report: {
        pid: req.body.pid,
        movable: script.movable ?? true,
        blockers: script.movable === false ? [{ subject: 'fd 3', kind: 'io-uring', reason: 'io_uring cannot be moved' }] : [],
        warnings: [],
        summary: { threads: 1, vmaKinds: [], fdKinds: [] },
        residentBytes: 4096,
      },
    })),
  );
  app.get('/v1/kernel', async (_req, reply) => answer('kernel', undefined, undefined, reply, () => ({ kernelRelease: 'fake-kernel' })));
  app.post<{ Params: { id: string } }>('/v1/migrations/:id/prepare', async (req, reply) =>
    answer('prepare', req.params.id, req.body, reply, () => {
      state.set(req.params.id, 'prepared');
      return { id: req.params.id, ready: true, blockers: [], pageServer: { address: '127.0.0.1', port: 9, migrationId: req.params.id, token: 'a'.repeat(64) } };
    }),
  );
  app.post<{ Params: { id: string } }>('/v1/migrations/:id/precopy', async (req, reply) =>
    answer('precopy', req.params.id, req.body, reply, () => {
      state.set(req.params.id, 'precopy');
      return { id: req.params.id, role: 'source', state: 'precopy', pid: (req.body as { pid: number }).pid };
    }),
  );
  let rounds = 0;
  app.post<{ Params: { id: string } }>('/v1/migrations/:id/precopy/round', async (req, reply) =>
    answer('round', req.params.id, undefined, reply, () => {
      const n = rounds++;
      const pages = n === 0 ? 1000 : Math.max(1, 400 >> n);
      return {
        id: req.params.id,
        round: { round: n, pages, bytes: pages * 4096, elapsedMs: 10, scanMs: 0.5, dirtyRateBytesPerSec: 2e6, bandwidthBytesPerSec: 4e8, predictedDowntimeMs: 5 + pages / 100 },
        verdict: script.verdicts?.[n] ?? 'converged',
        throttlePercent: n >= 2 ? 20 : 0,
      };
    }),
  );
  app.post<{ Params: { id: string } }>('/v1/migrations/:id/source', async (req, reply) => {
    state.set(req.params.id, 'dumping');
    return answer('source', req.params.id, req.body, reply, () => {
      if (state.get(req.params.id) === 'aborted') return reply.code(409).send({ error: 'aborted', message: 'aborted during dump' });
      state.set(req.params.id, 'dumped');
      const lazy = (req.body as { lazy?: boolean }).lazy === true;
      return {
        id: req.params.id,
        ...(lazy && { pageSource: { address: '127.0.0.1', port: 10, pages: 300 } }),
        image: Buffer.from('fake image').toString('base64'),
        freeze: { threads: [1], elapsedNs: 1000 },
        frozenMs: 3.5,
        dump: { dataPages: 10, zeroPages: 2, skippedPages: 0, bytes: 40960, pagesElapsedNs: 1e6, elapsedNs: 1e6 },
        transfer: { dataPages: 10, zeroPages: 2, records: 3, payloadBytes: 40960, wireBytes: 41000, elapsedSecs: 0.001, throughputBytesPerSec: 4.1e7 },
      };
    });
  });
  app.post<{ Params: { id: string } }>('/v1/migrations/:id/restore', async (req, reply) =>
    answer('restore', req.params.id, req.body, reply, () => {
      state.set(req.params.id, 'restored');
      return { id: req.params.id, restore: { pid: 4242, threads: [4242], timings: { cloneNs: 1, memoryNs: 1, threadsNs: 1, totalNs: 3 }, pagesWritten: 10, bytesWritten: 40960, warnings: [] } };
    }),
  );
  let looks = 0;
  app.get<{ Params: { id: string } }>('/v1/migrations/:id/homing', async (req, reply) =>
    answer('homing', req.params.id, undefined, reply, () => {
      const seq = script.homing ?? ['running', 'homed'];
      const s = seq[Math.min(looks++, seq.length - 1)]!;
      if (s === 'lost') {
        lost = true;
        (reply as unknown as { hijack(): void }).hijack();
        req.raw.socket.destroy();
        return undefined;
      }
      const done = s === 'homed' ? 300 : s === 'failed' ? 120 : 100;
      return {
        id: req.params.id,
        state: s === 'reconnecting' ? 'running' : s,
        detail: s === 'failed' ? 'lazy pages at 0x7f0000000000: the source could not be reached for 30 s' : null,
        pendingPages: 300 - done,
        lazyPages: 300,
        faults: 7,
        faultPages: 40,
        backgroundPages: done - 40,
        zeroPages: 0,
        faultP50Ms: 0.08,
        faultP99Ms: 0.9,
        elapsedMs: 20 * looks,
        homeMs: s === 'homed' ? 42 : null,
        remote: { state: s === 'reconnecting' ? 'reconnecting' : s === 'failed' ? 'failed' : s === 'homed' ? 'closed' : 'connected', reconnects: s === 'reconnecting' || looks > 2 ? 1 : 0, disconnectedMs: 0, faultRequests: 7, requestP50Ms: 0.07, requestP99Ms: 0.8, bytes: done * 4096, lastError: null },
      };
    }),
  );
  let sourceLooks = 0;
  app.get<{ Params: { id: string } }>('/v1/migrations/:id/page-source', async (req, reply) =>
    answer('page-source', req.params.id, undefined, reply, () => {
      const seq = script.pageSource ?? [{ homed: false, idleMs: null }];
      const p = seq[Math.min(sourceLooks++, seq.length - 1)]!;
      return { id: req.params.id, state: state.get(req.params.id) ?? 'dumped', serving: true, homed: p.homed, activeConnections: p.idleMs === null ? 1 : 0, idleMs: p.idleMs, connections: 2, pages: 100, bytes: 409600 };
    }),
  );
  app.post<{ Params: { id: string } }>('/v1/migrations/:id/commit', async (req, reply) =>
    answer('commit', req.params.id, undefined, reply, () => {
      if (!state.has(req.params.id)) return reply.code(404).send({ error: 'not-found', message: 'unknown' });
      state.set(req.params.id, 'committed');
      return { id: req.params.id, state: 'committed' };
    }),
  );
  app.post<{ Params: { id: string } }>('/v1/migrations/:id/abort', async (req, reply) =>
    answer('abort', req.params.id, undefined, reply, () => {
      if (!state.has(req.params.id)) return reply.code(404).send({ error: 'not-found', message: 'unknown' });
      state.set(req.params.id, 'aborted');
      return { id: req.params.id, state: 'aborted' };
    }),
  );
  await app.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => app.close());
  return { app, calls, state, script, host: { name, url: urlOf(app) } as HostRecord, steps: () => calls.map((c) => c.step) };
}

export async function waitFor<T>(what: string, probe: () => T | Promise<T>, timeoutMs = 10_000): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v) return v as NonNullable<T>;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
