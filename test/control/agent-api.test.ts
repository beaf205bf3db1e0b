// Every route of the agent's control API through inject(): token, schema errors naming the field,
// unknown ids, the destination's readiness against a real process, the honest 501 while the engine's
// migration glue is missing, and the roles' sequence with an engine double passed in by the test.
import t from 'tap';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildAgentApp, missingNativeFunctions, type MigrationEngine } from '@tern/agent';
import { auth, token } from './helpers.js';

const config = { name: 'hostT', listen: '127.0.0.1', port: 0, clusterToken: token };
const id = 'm0123456789ab';
const destination = { address: '127.0.0.1', port: 9, migrationId: id, token: 'ab'.repeat(32) };

const routes: { method: 'GET' | 'POST'; url: string; payload?: unknown }[] = [
  { method: 'GET', url: '/metrics' },
  { method: 'GET', url: '/v1/kernel' },
  { method: 'POST', url: '/v1/check', payload: { pid: 1 } },
  { method: 'POST', url: `/v1/migrations/${id}/prepare`, payload: { pid: 1 } },
  { method: 'POST', url: `/v1/migrations/${id}/source`, payload: { pid: 1, destination } },
  { method: 'POST', url: `/v1/migrations/${id}/restore`, payload: { image: 'AAAA' } },
  { method: 'POST', url: `/v1/migrations/${id}/commit` },
  { method: 'POST', url: `/v1/migrations/${id}/abort` },
  { method: 'GET', url: `/v1/migrations/${id}` },
];

t.test('every route but /healthz needs the cluster token', async (t) => {
  const { app } = buildAgentApp(config);
  t.teardown(() => app.close());
  t.equal((await app.inject({ method: 'GET', url: '/healthz' })).statusCode, 200);
  for (const r of routes) {
    const none = await app.inject({ ...r });
    t.equal(none.statusCode, 401, `${r.method} ${r.url} without a token`);
    t.match(none.json(), { error: 'unauthorized', message: /missing Authorization/ });
    const wrong = await app.inject({ ...r, headers: { authorization: 'Bearer not-the-token' } });
    t.equal(wrong.statusCode, 401, `${r.method} ${r.url} with a wrong token`);
    t.match(wrong.json().message, /wrong cluster token/);
  }
});

t.test('schema errors answer 400 naming the field', async (t) => {
  const { app } = buildAgentApp(config);
  t.teardown(() => app.close());
  const cases: [string, unknown, RegExp][] = [
    [`/v1/migrations/${id}/prepare`, { pid: 'x' }, /pid/],
    [`/v1/migrations/${id}/prepare`, { pid: 5, files: [{ size: 3 }] }, /files\/0.*path|path/],
    [`/v1/migrations/${id}/source`, { pid: 5 }, /destination/],
    [`/v1/migrations/${id}/source`, { pid: 5, destination: { ...destination, token: 'short' } }, /destination\/token/],
    [`/v1/migrations/${id}/source`, { pid: 5, destination: { ...destination, port: 70000 } }, /destination\/port/],
    [`/v1/migrations/${id}/restore`, { image: 'not base64!' }, /image/],
    [`/v1/migrations/${id}/restore`, {}, /image/],
    ['/v1/migrations/bad id!/abort', undefined, /id/],
  ];
  for (const [url, payload, field] of cases) {
    const r = await app.inject({ method: 'POST', url, headers: auth, ...(payload !== undefined && { payload: payload as object }) });
    t.equal(r.statusCode, 400, `${url} ${JSON.stringify(payload)}`);
    t.match(r.json().message, field, `names the field: ${r.json().message}`);
  }
});

t.test('unknown migration ids answer 404', async (t) => {
  const { app } = buildAgentApp(config);
  t.teardown(() => app.close());
  for (const [method, url, payload] of [
    ['GET', `/v1/migrations/${id}`],
    ['POST', `/v1/migrations/${id}/commit`],
    ['POST', `/v1/migrations/${id}/abort`],
    ['POST', `/v1/migrations/${id}/restore`, { image: 'AAAA' }],
  ] as const) {
    const r = await app.inject({ method, url, headers: auth, ...(payload && { payload }) });
    t.equal(r.statusCode, 404, `${method} ${url}`);
    t.equal(r.json().error, 'not-found');
  }
});

t.test('destination readiness is checked for real; the engine is called only when present', async (t) => {
  const { app, metrics } = buildAgentApp(config);
  t.teardown(() => app.close());
  const child = spawn('sleep', ['60'], { stdio: 'ignore' });
  t.teardown(() => child.kill('SIGKILL'));
  const taken = await app.inject({
    method: 'POST',
    url: `/v1/migrations/${id}/prepare`,
    headers: auth,
    payload: { pid: child.pid, kernelRelease: 'not-this-kernel', files: [{ path: '/nonexistent/tern-file' }, { path: '/etc/hostname', size: 1 }], residentBytes: 2 ** 52 },
  });
  t.equal(taken.statusCode, 200);
  const body = taken.json();
  t.equal(body.ready, false);
  t.equal(body.pageServer, null);
  t.same(body.blockers.map((b: { kind: string }) => b.kind).sort(), ['file-changed', 'file-missing', 'kernel-mismatch', 'memory', 'pid-taken']);

  // A pid free here (the highest possible one is never in use on this machine).
  const free = await app.inject({ method: 'POST', url: `/v1/migrations/${id}/prepare`, headers: auth, payload: { pid: 2147483000 } });
  const src = await app.inject({ method: 'POST', url: `/v1/migrations/${id}b/source`, headers: auth, payload: { pid: child.pid, destination } });
  const missing = missingNativeFunctions();
  if (missing.length) {
    t.equal(free.statusCode, 501, `the engine lacks ${missing.join(', ')}: 501`);
    t.same(free.json(), { error: 'unavailable', message: 'cold migration engine is not built in this version' });
    t.equal(src.statusCode, 501);
    t.equal((await app.inject({ method: 'GET', url: `/v1/migrations/${id}b`, headers: auth })).statusCode, 404, 'nothing recorded for a refused role');
  } else {
    t.equal(free.statusCode, 200, 'the page server starts');
    t.match(free.json(), { ready: true, pageServer: { address: '127.0.0.1', port: Number, token: /^[0-9a-f]{64}$/ } });
    t.equal((await app.inject({ method: 'POST', url: `/v1/migrations/${id}/abort`, headers: auth })).statusCode, 200, 'and is closed by abort');
    t.not(src.statusCode, 501);
  }
  const text = await metrics.registry.metrics();
  t.match(text, /tern_agent_engine_operations_total\{operation="prepare",outcome="not-ready"\} 1/);
});

/** An engine double: records the calls the agent makes, in order. */
function engineDouble(opts: { failDump?: boolean; dumpMs?: number; verdict?: 'continue' | 'not-shrinking'; dirtyRate?: number } = {}) {
  const calls: string[] = [];
  const engine: MigrationEngine = {
    async startPageServer(o) {
      calls.push(`PageServer.start ${o.address} ${o.migrationId}`);
      return { address: o.address, port: 40000, close: async () => void calls.push('server.close') };
    },
    async openSource(pid) {
      calls.push(`SourceSession.open ${pid}`);
      return {
        freeze: async () => (calls.push('freeze'), { threads: [pid], elapsedNs: 1000 }),
        dump: async (d) => {
          calls.push(`dump ${d.address}:${d.port}`);
          await new Promise((r) => setTimeout(r, opts.dumpMs ?? 0));
          if (opts.failDump) throw new Error('page server refused the token');
          return { image: Buffer.from('img'), dump: { dataPages: 1, zeroPages: 0, skippedPages: 0, bytes: 4096, pagesElapsedNs: 1, elapsedNs: 1 }, transfer: { dataPages: 1, zeroPages: 0, records: 1, payloadBytes: 4096, wireBytes: 4200, elapsedSecs: 0.001, throughputBytesPerSec: 4e6 } };
        },
        commit: async () => void calls.push('commit'),
        abort: async () => void calls.push('abort'),
      };
    },
    async openPrecopy(pid) {
      calls.push(`PrecopySession.open ${pid}`);
      let n = 0;
      return {
        round: async (d) => {
          calls.push(`round ${n} ${d.address}:${d.port}`);
          const pages = n === 0 ? 100 : 10;
          return { round: n++, pages, bytes: pages * 4096, elapsedMs: 1, scanMs: 0.1, dirtyRateBytesPerSec: opts.dirtyRate ?? 1e6, bandwidthBytesPerSec: 1e8, predictedDowntimeMs: 2 };
        },
        decide: async () => (calls.push('decide'), n >= 3 ? 'converged' : opts.verdict ?? 'continue'),
        finish: async (d) => {
          calls.push(`finish ${d.address}:${d.port}`);
          return { image: Buffer.from('img'), freeze: { threads: [pid], elapsedNs: 1000 }, dump: { dataPages: 10, zeroPages: 0, skippedPages: 0, bytes: 40960, pagesElapsedNs: 1, elapsedNs: 1 }, transfer: { dataPages: 10, zeroPages: 0, records: 1, payloadBytes: 40960, wireBytes: 41000, elapsedSecs: 0.001, throughputBytesPerSec: 4e7 } };
        },
        commit: async () => void calls.push('precopy.commit'),
        abort: async () => void calls.push('precopy.abort'),
      };
    },
    async restore(image) {
      calls.push(`restore ${image.toString()}`);
      return { pid: 4242, threads: [4242], timings: { cloneNs: 1, memoryNs: 1, threadsNs: 1, totalNs: 3 }, pagesWritten: 1, bytesWritten: 4096, warnings: [], nudgedConnections: 0 };
    },
  };
  return { engine, calls };
}

t.test('the roles in sequence (engine double): prepare, source, restore, commit; 409s out of order', async (t) => {
  const { engine, calls } = engineDouble();
  const { app } = buildAgentApp(config, { engine });
  t.teardown(() => app.close());
  const post = (url: string, payload?: object) => app.inject({ method: 'POST', url, headers: auth, ...(payload && { payload }) });
  const prep = await post(`/v1/migrations/${id}/prepare`, { pid: 2147483000 });
  t.equal(prep.statusCode, 200);
  t.equal(prep.json().pageServer.port, 40000);
  t.equal((await post(`/v1/migrations/${id}/prepare`, { pid: 2147483000 })).statusCode, 409, 'a second prepare of the same id');
  t.equal((await post(`/v1/migrations/${id}/commit`)).statusCode, 409, 'commit before restore');
  const restore = await post(`/v1/migrations/${id}/restore`, { image: Buffer.from('img').toString('base64') });
  t.equal(restore.statusCode, 200);
  t.equal(restore.json().restore.pid, 4242);
  const commit = await post(`/v1/migrations/${id}/commit`);
  t.equal(commit.json().state, 'committed');
  t.equal((await post(`/v1/migrations/${id}/commit`)).statusCode, 200, 'commit is idempotent');
  t.equal((await post(`/v1/migrations/${id}/abort`)).statusCode, 409, 'no abort after the commit point');

  const src = await post('/v1/migrations/msrc/source', { pid: 77, destination });
  t.equal(src.statusCode, 200);
  t.equal(Buffer.from(src.json().image, 'base64').toString(), 'img');
  t.type(src.json().frozenMs, 'number');
  t.equal((await post('/v1/migrations/msrc/commit')).json().state, 'committed');
  t.match(calls[0], /^PageServer\.start 127\.0\.0\.1 [0-9a-f]{32}$/, 'a fresh 128-bit page stream id');
  t.same(calls.slice(1), [
    'restore img',
    'server.close',
    'SourceSession.open 77',
    'freeze',
    'dump 127.0.0.1:9',
    'commit',
  ]);
});

t.test('a failed dump thaws the source; abort during a dump waits for it and thaws once', async (t) => {
  const failing = engineDouble({ failDump: true });
  const a = buildAgentApp(config, { engine: failing.engine });
  t.teardown(() => a.app.close());
  const r = await a.app.inject({ method: 'POST', url: '/v1/migrations/mf/source', headers: auth, payload: { pid: 77, destination } });
  t.equal(r.statusCode, 500);
  t.match(r.json().message, /page server refused/);
  t.same(failing.calls.slice(-2), ['dump 127.0.0.1:9', 'abort'], 'the original was put back');
  t.equal((await a.app.inject({ method: 'GET', url: '/v1/migrations/mf', headers: auth })).json().state, 'failed');

  const slow = engineDouble({ dumpMs: 300 });
  const b = buildAgentApp(config, { engine: slow.engine });
  t.teardown(() => b.app.close());
  const dumping = b.app.inject({ method: 'POST', url: '/v1/migrations/ms/source', headers: auth, payload: { pid: 78, destination } });
  await new Promise((res) => setTimeout(res, 100));
  const abort = await b.app.inject({ method: 'POST', url: '/v1/migrations/ms/abort', headers: auth });
  t.equal(abort.statusCode, 200);
  t.equal(abort.json().state, 'aborted');
  t.equal((await dumping).statusCode, 409, 'the dump answers: aborted');
  t.equal(slow.calls.filter((c) => c === 'abort').length, 1, 'thawed exactly once');
  t.equal((await b.app.inject({ method: 'POST', url: '/v1/migrations/ms/abort', headers: auth })).statusCode, 200, 'abort is idempotent');
});

t.test('pre-copy roles (engine double): start, rounds with verdicts, switchover finishes it, commit; abort mid-way', async (t) => {
  const { engine, calls } = engineDouble();
  const { app } = buildAgentApp(config, { engine });
  t.teardown(() => app.close());
  const post = (url: string, payload?: object) => app.inject({ method: 'POST', url, headers: auth, ...(payload && { payload }) });
  t.equal((await post('/v1/migrations/mpre/precopy/round')).statusCode, 404, 'a round without a pre-copy');
  const start = await post('/v1/migrations/mpre/precopy', { pid: 78, destination, maxDowntimeMs: 50, autoConverge: false });
  t.equal(start.statusCode, 200);
  t.equal(start.json().state, 'precopy');
  t.equal((await post('/v1/migrations/mpre/precopy', { pid: 78, destination })).statusCode, 409, 'a second start');
  const verdicts: string[] = [];
  for (let i = 0; i < 3; i++) {
    const r = await post('/v1/migrations/mpre/precopy/round');
    t.equal(r.statusCode, 200);
    t.equal(r.json().round.round, i);
    verdicts.push(r.json().verdict);
  }
  t.same(verdicts, ['continue', 'continue', 'converged']);
  const src = await post('/v1/migrations/mpre/source', { pid: 78, destination });
  t.equal(src.statusCode, 200, 'the switchover takes over the pre-copy session');
  t.same(src.json().freeze, { threads: [78], elapsedNs: 1000 });
  t.equal((await post('/v1/migrations/mpre/precopy/round')).statusCode, 409, 'no round after the switchover');
  t.equal((await post('/v1/migrations/mpre/commit')).json().state, 'committed');
  t.same(calls, ['PrecopySession.open 78', 'round 0 127.0.0.1:9', 'decide', 'round 1 127.0.0.1:9', 'decide', 'round 2 127.0.0.1:9', 'decide', 'finish 127.0.0.1:9', 'precopy.commit']);

  calls.length = 0;
  t.equal((await post('/v1/migrations/mpre2/precopy', { pid: 79, destination })).statusCode, 200);
  t.equal((await post('/v1/migrations/mpre2/precopy/round')).statusCode, 200);
  const aborted = await post('/v1/migrations/mpre2/abort');
  t.equal(aborted.json().state, 'aborted');
  t.same(calls, ['PrecopySession.open 79', 'round 0 127.0.0.1:9', 'decide', 'precopy.abort'], 'abort stops tracking; nothing was frozen');
});

t.test('address handoff through a hook script: claim before the restore, release on rollback; a failing hook fails the restore', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tern-hook-'));
  const log = join(dir, 'calls.log');
  const hook = join(dir, 'hook.sh');
  writeFileSync(hook, `#!/bin/sh\necho "$1 $TERN_PHASE $TERN_ROLE $TERN_MIGRATION_ID $TERN_PID $TERN_FROM $TERN_TO $TERN_ADDRESSES" >> ${log}\n[ -e ${dir}/fail ] && { echo "cloud API said no" >&2; exit 3; }\nexit 0\n`, { mode: 0o755 });
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const { engine, calls } = engineDouble();
  const { app } = buildAgentApp({ ...config, addressHook: hook }, { engine });
  t.teardown(() => app.close());
  const post = (url: string, payload?: object) => app.inject({ method: 'POST', url, headers: auth, ...(payload && { payload }) });
  const lines = () => (existsSync(log) ? readFileSync(log, 'utf8').trim().split('\n') : []);

  t.equal((await post('/v1/migrations/mhook1/prepare', { pid: 2147483001 })).statusCode, 200);
  const image = Buffer.from('img').toString('base64');
  const restored = await post('/v1/migrations/mhook1/restore', { image, addresses: ['192.0.2.10/32'], from: 'hostA', to: 'hostT' });
  t.equal(restored.statusCode, 200);
  t.same(lines(), ['claim claim destination mhook1 2147483001 hostA hostT 192.0.2.10/32'], 'the hook claimed the address before the restore');
  t.ok(calls.indexOf('restore img') > 0);
  t.equal((await post('/v1/migrations/mhook1/abort')).json().state, 'aborted');
  t.same(lines().slice(1), ['release release destination mhook1 2147483001 hostA hostT 192.0.2.10/32'], 'and released it on rollback');

  writeFileSync(join(dir, 'fail'), '');
  t.equal((await post('/v1/migrations/mhook2/prepare', { pid: 2147483002 })).statusCode, 200);
  const failed = await post('/v1/migrations/mhook2/restore', { image, addresses: ['192.0.2.10/32'] });
  t.equal(failed.statusCode, 422);
  t.match(failed.json(), { error: 'address-handoff', message: /hook .* claim failed \(3\): cloud API said no/ });
  t.equal(calls.filter((c) => c === 'restore img').length, 1, 'nothing was restored after the failed claim');
  t.notMatch(execFileSync('nft', ['list', 'tables']).toString(), /tern-mhook/, 'and the restore guard table is gone');

  const bad = await post('/v1/migrations/mhook3/restore', { image, addresses: ['not an address'] });
  t.equal(bad.statusCode, 400, 'addresses are validated');
});

t.test('a destination takes only its own service addresses', async (t) => {
  const { engine } = engineDouble();
  const { app } = buildAgentApp({ ...config, serviceAddresses: ['192.0.2.20/32'] }, { engine });
  t.teardown(() => app.close());
  const post = (url: string, payload?: object) => app.inject({ method: 'POST', url, headers: auth, ...(payload && { payload }) });
  t.equal((await post('/v1/migrations/mown/prepare', { pid: 2147483003 })).statusCode, 200);
  const r = await post('/v1/migrations/mown/restore', { image: Buffer.from('img').toString('base64'), addresses: ['192.0.2.99/32'] });
  t.equal(r.statusCode, 422);
  t.match(r.json().message, /192\.0\.2\.99\/32 is not among this host's service addresses \(192\.0\.2\.20\/32\)/);
  t.equal((await post('/v1/migrations/mown/abort')).json().state, 'aborted');
});

t.test('post-copy roles (engine double): the source serves what stays, the destination pulls it with its page credentials and reports homing', async (t) => {
  const { engine, calls } = engineDouble();
  const served = { connections: 2, rejected: 0, requests: 3, pages: 5, bytes: 20480, refusedRequests: 0, activeConnections: 1, homed: false, idleMs: null as number | null };
  // The source leaves its private memory in the frozen original and says where it serves it.
  const openSource = engine.openSource.bind(engine);
  engine.openSource = async (pid) => {
    const s = await openSource(pid);
    return {
      ...s,
      dump: async (d, lazy) => {
        const out = await s.dump(d);
        calls.push(`lazy ${lazy?.address ?? 'none'}`);
        return { ...(Buffer.isBuffer(out) ? { image: out } : out), pageSource: lazy ? { address: lazy.address, port: 41000, pages: 5 } : null };
      },
      pageSourceStats: () => ({ ...served }),
    };
  };
  // The destination's page server reports a lazy fill that ends homed after one reconnect.
  const homed = {
    pid: 4242,
    state: { state: 'homed' as const },
    summary: { ranges: 1, registeredPages: 8, lazyPages: 5, features: 0 },
    faults: 2, faultPages: 2, zeroPages: 0, backgroundPages: 3, droppedPages: 0, pendingPages: 0,
    eventsFork: 0, forksUnguarded: 0, eventsRemap: 0, eventsRemove: 0, eventsUnmap: 0, retries: 0,
    faultP50Ns: 80_000, faultP99Ns: 900_000, faultMaxNs: 900_000, elapsedNs: 5e6, homeNs: 5e6,
    remote: { state: 'closed' as const, reconnects: 1, disconnectedNs: 2e9, faultRequests: 2, faultPages: 2, prefetchPages: 3, bytes: 20480, requestP50Ns: 70_000, requestP99Ns: 800_000, lastError: 'connection reset by peer' },
  };
  let samples = [50_000, 80_000, 900_000];
  const startPageServer = engine.startPageServer.bind(engine);
  let restoredYet = false;
  engine.startPageServer = async (o) => ({
    ...(await startPageServer(o)),
    lazyStats: () => (restoredYet ? homed : null),
    lazyWait: async () => homed,
    lazyFaultSamples: () => {
      const s = samples;
      samples = [];
      return s;
    },
  });
  let remote: unknown;
  const restore = engine.restore.bind(engine);
  engine.restore = async (image, server, opts) => {
    remote = opts?.remote;
    restoredYet = true;
    const r = await restore(image, server, opts);
    return { ...r, lazy: { ranges: 1, registeredPages: 8, lazyPages: 5, features: 0 } };
  };
  const { app, metrics } = buildAgentApp(config, { engine });
  t.teardown(() => app.close());
  const post = (url: string, payload?: object) => app.inject({ method: 'POST', url, headers: auth, ...(payload && { payload }) });

  const src = await post('/v1/migrations/mpsrc/source', { pid: 77, destination, lazy: true });
  t.equal(src.statusCode, 200, src.body);
  t.same(src.json().pageSource, { address: '127.0.0.1', port: 41000, pages: 5 }, 'where the destination pulls from');
  t.ok(calls.includes('lazy 127.0.0.1'), 'the page source binds on the agent address');
  const plain = await post('/v1/migrations/mpsrc2/source', { pid: 78, destination });
  t.equal(plain.json().pageSource, null, 'no page source unless asked');
  const get = (url: string) => app.inject({ method: 'GET', url, headers: auth });
  t.match((await get('/v1/migrations/mpsrc/page-source')).json(), { id: 'mpsrc', state: 'dumped', serving: true, homed: false, activeConnections: 1, idleMs: null, pages: 5 }, 'the pull as the source sees it');
  Object.assign(served, { activeConnections: 0, idleMs: 1234.5 });
  t.match((await get('/v1/migrations/mpsrc/page-source')).json(), { activeConnections: 0, idleMs: 1234.5 }, 'how long since the destination pulled');
  t.equal((await get('/v1/migrations/nosuch/page-source')).statusCode, 404);
  served.homed = true;
  const refused = await post('/v1/migrations/mpsrc/abort');
  t.equal(refused.statusCode, 409, 'a source that heard "every page home" refuses to resume the original');
  t.match(refused.json(), { error: 'homed' });
  t.equal((await post('/v1/migrations/mpsrc/commit')).json().state, 'committed');
  t.match(await metrics.registry.metrics(), /tern_agent_page_bytes_total\{direction="sent"\} 28880/, 'the dumps (2 × 4200) and what the page source served (20480) count as sent');

  const prep = (await post('/v1/migrations/mpdst/prepare', { pid: 2147483004 })).json();
  const none = await app.inject({ method: 'GET', url: '/v1/migrations/mpdst/homing', headers: auth });
  t.equal(none.json().state, 'none', 'nothing lazy before the restore');
  const restored = await post('/v1/migrations/mpdst/restore', { image: Buffer.from('img').toString('base64'), pullFrom: { address: '127.0.0.1', port: 41000, bandwidthBytesPerSec: 5_000_000, giveUpAfterMs: 2000 } });
  t.equal(restored.statusCode, 200, restored.body);
  t.same(remote, { address: '127.0.0.1', port: 41000, bandwidthBytesPerSec: 5_000_000, giveUpAfterMs: 2000, migrationId: prep.pageServer.migrationId, token: prep.pageServer.token }, 'the pull carries this migration\'s page credentials');
  const h = await app.inject({ method: 'GET', url: '/v1/migrations/mpdst/homing?waitMs=100', headers: auth });
  t.equal(h.statusCode, 200);
  t.match(h.json(), { state: 'homed', lazyPages: 5, pendingPages: 0, faultPages: 2, backgroundPages: 3, faultP50Ms: 0.08, homeMs: 5, remote: { state: 'closed', reconnects: 1, disconnectedMs: 2000, lastError: 'connection reset by peer' } });
  t.equal((await app.inject({ method: 'GET', url: '/v1/migrations/mpdst/homing?waitMs=60001', headers: auth })).statusCode, 400, 'the query is validated');
  t.equal((await app.inject({ method: 'GET', url: '/v1/migrations/mpsrc/homing', headers: auth })).statusCode, 404, 'a source has no homing');
  // The watcher feeds the metrics once the fill is over.
  let text = '';
  for (let i = 0; i < 50 && !/tern_agent_lazy_pages_total\{how="background"\} 3/.test(text); i++) {
    await new Promise((r) => setTimeout(r, 20));
    text = await metrics.registry.metrics();
  }
  t.match(text, /tern_agent_lazy_pages_total\{how="fault"\} 2/);
  t.match(text, /tern_agent_lazy_pages_total\{how="background"\} 3/);
  t.match(text, /tern_agent_postcopy_fault_latency_seconds_count 3/, 'every fault sample in the histogram');
  t.match(text, /tern_agent_postcopy_fault_latency_seconds_bucket\{le="0.0001"\} 2/);
  t.match(text, /tern_agent_pull_reconnects_total 1/);
  t.match(text, /tern_agent_lazy_pending_pages 0/);
});
