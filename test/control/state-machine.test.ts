// The migration state machine against scripted agents over real HTTP: the order of the agent calls,
// every transition, failures and aborts before the commit point rolled back (destination first, then
// source), the WebSocket stream (replay then live, in order), and recovery from SQLite after a restart.
import t from 'tap';
import { join } from 'node:path';
import WebSocket from 'ws';
import { MigrationStore } from '@tern/coordinator';
import type { MigrationEvent } from '@tern/protocol';
import { auth, coordinatorOn, fakeAgent, tempDir, token, waitFor } from './helpers.js';

const PHASES = ['checking', 'precopy', 'switchover', 'restoring', 'postcopy'];
const phasesOf = (events: MigrationEvent[]) => events.filter((e) => e.type === 'phase').map((e) => e.state);

t.test('success: every phase in order, agents called in the protocol order', async (t) => {
  const a = await fakeAgent(t, 'hostA');
  const b = await fakeAgent(t, 'hostB');
  const { coordinator } = coordinatorOn(t, join(tempDir(t), 'c.db'), [a.host, b.host]);
  const rec = coordinator.create({ from: 'hostA', to: 'hostB', pid: 42, mode: 'cold', bandwidth: 100 });
  const done = await coordinator.settled(rec.id);
  t.equal(done.state, 'done');
  t.equal(done.committed, true);
  t.equal(done.failure, null);
  t.equal(done.stats.bytes, 41000);
  t.same(done.stats.pages, { data: 10, zero: 2, dirty: 0, lazy: 0 });
  t.equal(done.stats.restoredPid, 4242);
  t.ok(done.stats.downtimeMs! >= 3.5, 'downtime counts the source-measured frozen time');
  t.ok(done.stats.totalMs! >= done.stats.downtimeMs!, 'total ≥ downtime');
  t.same(a.steps(), ['check', 'kernel', 'source', 'commit'], 'source: check, kernel, freeze+dump, commit');
  t.same(b.steps(), ['prepare', 'restore', 'commit'], 'destination: prepare, restore, commit');
  const prepare = b.calls.find((c) => c.step === 'prepare')!.body as { pid: number; kernelRelease: string; bandwidthBytesPerSec: number };
  t.match(prepare, { pid: 42, kernelRelease: 'fake-kernel', bandwidthBytesPerSec: 100_000_000 });
  const events = coordinator.events(rec.id);
  t.same(phasesOf(events), PHASES);
  t.same(events.map((e) => e.seq), events.map((_, i) => i + 1), 'seq 1, 2, 3… without gaps');
  t.equal(events.at(-1)!.type, 'result');
  t.equal(events.at(-1)!.state, 'done');
});

t.test('failures before the commit point roll back: destination first, then source', async (t) => {
  const cases = [
    { name: 'restore fails', src: {}, dst: { fail: { restore: { status: 500, error: 'restore', message: 'mmap failed' } } }, kind: 'engine', phase: 'restoring', srcSteps: ['check', 'kernel', 'source', 'abort'], dstSteps: ['prepare', 'restore', 'abort'] },
    { name: 'dump fails', src: { fail: { source: { status: 422, error: 'dump', message: 'page stream broke' } } }, dst: {}, kind: 'engine', phase: 'switchover', srcSteps: ['check', 'kernel', 'source', 'abort'], dstSteps: ['prepare', 'abort'] },
    { name: 'engine not built', src: {}, dst: { fail: { prepare: { status: 501, error: 'unavailable', message: 'cold migration engine is not built in this version' } } }, kind: 'unavailable', phase: 'checking', srcSteps: ['check', 'kernel', 'abort'], dstSteps: ['prepare', 'abort'] },
    { name: 'not movable', src: { movable: false }, dst: {}, kind: 'not-movable', phase: 'checking', srcSteps: ['check', 'abort'], dstSteps: ['abort'] },
    { name: 'no such pid', src: { fail: { check: { status: 422, error: 'validate', message: 'no process with pid 42' } } }, dst: {}, kind: 'bad-input', phase: 'checking', srcSteps: ['check', 'abort'], dstSteps: ['abort'] },
  ] as const;
  for (const c of cases) {
    await t.test(c.name, async (t) => {
      const a = await fakeAgent(t, 'hostA', c.src);
      const b = await fakeAgent(t, 'hostB', c.dst);
      const { coordinator } = coordinatorOn(t, join(tempDir(t), 'c.db'), [a.host, b.host]);
      const rec = await coordinator.settled(coordinator.create({ from: 'hostA', to: 'hostB', pid: 42, mode: 'cold' }).id);
      t.equal(rec.state, 'failed');
      t.equal(rec.committed, false);
      t.match(rec.failure, { kind: c.kind, phase: c.phase });
      t.same(a.steps(), c.srcSteps);
      t.same(b.steps(), c.dstSteps);
      const abortOrder = [...a.calls, ...b.calls].filter((x) => x.step === 'abort');
      t.equal(abortOrder.length, 2);
      if (c.kind === 'not-movable') t.equal(rec.failure!.blockers![0]!.kind, 'io-uring');
      const text = await coordinator.metrics.registry.metrics();
      t.match(text, /tern_migrations_total\{mode="cold",result="failed"\} 1/);
    });
  }
});

t.test('pre-copy: rounds until the verdict says stop, each a progress event, then the same switchover', async (t) => {
  const a = await fakeAgent(t, 'hostA', { verdicts: ['continue', 'continue', 'not-shrinking'] });
  const b = await fakeAgent(t, 'hostB');
  const { coordinator } = coordinatorOn(t, join(tempDir(t), 'c.db'), [a.host, b.host]);
  const events: MigrationEvent[] = [];
  coordinator.subscribe(null, (e) => events.push(e));
  const rec = await coordinator.settled(coordinator.create({ from: 'hostA', to: 'hostB', pid: 42, mode: 'precopy', maxDowntimeMs: 50, bandwidth: 100 }).id);
  t.equal(rec.state, 'done');
  t.same(a.steps(), ['check', 'kernel', 'precopy', 'round', 'round', 'round', 'source', 'commit']);
  const start = a.calls.find((c) => c.step === 'precopy')!.body as { maxDowntimeMs: number; bandwidthBytesPerSec: number; autoConverge: boolean; fixedCostMs: number };
  t.match(start, { maxDowntimeMs: 50, bandwidthBytesPerSec: 100_000_000, autoConverge: true });
  t.ok(start.fixedCostMs > 0, 'the switchover cost estimate goes with it');
  t.equal(rec.stats.rounds, 3, '3 rounds while it ran (the final dirty set moves inside the freeze)');
  const progress = events.filter((e) => e.type === 'progress' && e.state === 'precopy');
  t.same(progress.map((e) => e.progress!.round), [0, 1, 2]);
  t.same(progress.map((e) => e.progress!.pages), [1000, 200, 100]);
  t.equal(progress[2]!.progress!.throttlePercent, 20, 'the throttle is reported');
  t.ok(events.some((e) => /pre-copy ends after 3 rounds: the dirty set stopped shrinking/.test(e.message)));
  t.equal(rec.stats.bytes, (1000 + 200 + 100) * 4096 + 41000, 'bytes: every round plus the switchover');
  const text = await coordinator.metrics.registry.metrics();
  t.match(text, /tern_precopy_rounds_total 3/);
  t.match(text, /tern_migrations_total\{mode="precopy",result="done"\} 1/);
});

t.test('hybrid (the default): rounds, a switchover that leaves the last pages on the source, then homing before the kill', async (t) => {
  const a = await fakeAgent(t, 'hostA', { verdicts: ['continue', 'converged'] });
  const b = await fakeAgent(t, 'hostB', { homing: ['running', 'reconnecting', 'running', 'homed'] });
  const { coordinator } = coordinatorOn(t, join(tempDir(t), 'c.db'), [a.host, b.host]);
  const events: MigrationEvent[] = [];
  coordinator.subscribe(null, (e) => events.push(e));
  const rec = await coordinator.settled(coordinator.create({ from: 'hostA', to: 'hostB', pid: 42, bandwidth: 100 }).id);
  t.equal(rec.mode, 'hybrid', 'hybrid when no mode is given');
  t.equal(rec.state, 'done');
  t.same(a.steps(), ['check', 'kernel', 'precopy', 'round', 'round', 'source', 'commit']);
  t.same(b.steps(), ['prepare', 'restore', 'homing', 'homing', 'homing', 'homing', 'commit'], 'the original is killed only after "homed"');
  t.match(a.calls.find((c) => c.step === 'source')!.body, { lazy: true });
  t.match(b.calls.find((c) => c.step === 'restore')!.body, { lazy: true, pullFrom: { address: '127.0.0.1', port: 10, bandwidthBytesPerSec: 100_000_000 } });
  t.match(rec.stats.homing, { remotePages: 300, faultPages: 40, backgroundPages: 260, homeMs: 42, reconnects: 1 });
  const homing = events.filter((e) => e.type === 'progress' && e.state === 'postcopy');
  t.equal(homing.length, 4, 'one progress event per look');
  t.same(homing.map((e) => e.progress!.pendingPages), [200, 200, 200, 0]);
  t.equal(homing[1]!.progress!.connection, 'reconnecting', 'a lost pull connection is visible in the events');
  t.ok(events.some((e) => e.type === 'log' && /pull connection .*: reconnecting/.test(e.message)));
  const text = await coordinator.metrics.registry.metrics();
  t.match(text, /tern_postcopy_home_seconds_count\{mode="hybrid"\} 1/);
  t.match(text, /tern_migrations_total\{mode="hybrid",result="done"\} 1/);
});

t.test('post-copy: no rounds; a pull that fails for good resumes the frozen original on the source', async (t) => {
  const a = await fakeAgent(t, 'hostA');
  const b = await fakeAgent(t, 'hostB', { homing: ['running', 'failed'] });
  const { coordinator } = coordinatorOn(t, join(tempDir(t), 'c.db'), [a.host, b.host]);
  const rec = await coordinator.settled(coordinator.create({ from: 'hostA', to: 'hostB', pid: 42, mode: 'postcopy', pullGiveUpMs: 2000 }).id);
  t.equal(rec.state, 'failed');
  t.equal(rec.pullGiveUpMs, 2000);
  t.match(b.calls.find((c) => c.step === 'restore')!.body, { pullFrom: { giveUpAfterMs: 2000 } }, 'the destination is told how long to retry');
  t.equal(rec.committed, true, 'it had passed the commit point');
  t.match(rec.failure, { kind: 'engine', phase: 'postcopy', message: /could not be reached.*resumed on hostA/ });
  t.same(a.steps(), ['check', 'kernel', 'source', 'abort'], 'never killed: thawed');
  t.same(b.steps(), ['prepare', 'restore', 'homing', 'homing', 'abort'], 'destination first');
});

t.test('post-copy: the destination agent lost mid-pull and silent past its give-up: the source resumes the original', async (t) => {
  const a = await fakeAgent(t, 'hostA', { pageSource: [{ homed: false, idleMs: null }, { homed: false, idleMs: 1200 }, { homed: false, idleMs: 6000 }] });
  const b = await fakeAgent(t, 'hostB', { homing: ['running', 'lost'] });
  const { coordinator } = coordinatorOn(t, join(tempDir(t), 'c.db'), [a.host, b.host]);
  const events: MigrationEvent[] = [];
  coordinator.subscribe(null, (e) => events.push(e));
  const rec = await coordinator.settled(coordinator.create({ from: 'hostA', to: 'hostB', pid: 42, mode: 'postcopy', pullGiveUpMs: 500 }).id);
  t.equal(rec.state, 'failed');
  t.match(rec.failure, { kind: 'engine', phase: 'postcopy', message: /hostB is lost .* has not pulled from hostA for 6\.0 s, past its 0\.5 s give-up: its copy is dead.*resumed on hostA/ });
  t.same(a.steps(), ['check', 'kernel', 'source', 'page-source', 'page-source', 'page-source', 'abort'], 'asked until silent past give-up + margin, then thawed');
  t.ok(events.some((e) => /still pulls from hostA/.test(e.message)), 'while the source still saw a pull connection it waited');
  t.ok(events.some((e) => /counts as dead after 5\.5 s/.test(e.message)), 'and said when it would decide');
  t.match(await coordinator.metrics.registry.metrics(), /tern_postcopy_lost_destination_total\{outcome="rolled-back"\} 1/);
});

t.test('post-copy: the destination agent lost after the source heard every page home: the migration finishes, the original never resumes', async (t) => {
  const a = await fakeAgent(t, 'hostA', { pageSource: [{ homed: true, idleMs: 10 }] });
  const b = await fakeAgent(t, 'hostB', { homing: ['running', 'lost'] });
  const { coordinator } = coordinatorOn(t, join(tempDir(t), 'c.db'), [a.host, b.host]);
  const events: MigrationEvent[] = [];
  coordinator.subscribe(null, (e) => events.push(e));
  const rec = await coordinator.settled(coordinator.create({ from: 'hostA', to: 'hostB', pid: 42, mode: 'postcopy' }).id);
  t.equal(rec.state, 'done');
  t.same(a.steps(), ['check', 'kernel', 'source', 'page-source', 'commit'], 'the original is killed, never thawed');
  t.ok(events.some((e) => /destination agent hostB unreachable .*every page was home/.test(e.message)), 'the lost destination is a warning');
  t.match(await coordinator.metrics.registry.metrics(), /tern_postcopy_lost_destination_total\{outcome="finished"\} 1/);
});

t.test('pre-copy: the switchover cost measured between two hosts is remembered for the next pre-copy, across coordinators', async (t) => {
  const a = await fakeAgent(t, 'hostA');
  const b = await fakeAgent(t, 'hostB');
  const db = join(tempDir(t), 'c.db');
  const first = coordinatorOn(t, db, [a.host, b.host]);
  const one = await first.coordinator.settled(first.coordinator.create({ from: 'hostA', to: 'hostB', pid: 42, mode: 'precopy' }).id);
  t.equal(one.state, 'done');
  const starts = () => a.calls.filter((c) => c.step === 'precopy').map((c) => (c.body as { fixedCostMs: number }).fixedCostMs);
  t.equal(starts()[0], 60, 'the first pre-copy between two hosts assumes the default');
  first.coordinator.close();
  const learned = new MigrationStore(db).switchoverOverhead('hostA', 'hostB');
  t.ok(learned !== undefined && learned !== 60, `learned ${learned?.toFixed(1)} ms from the first`);
  const second = coordinatorOn(t, db, [a.host, b.host]);
  const two = await second.coordinator.settled(second.coordinator.create({ from: 'hostA', to: 'hostB', pid: 43, mode: 'precopy' }).id);
  t.equal(two.state, 'done');
  t.equal(starts()[1], learned, 'a new coordinator over the same database starts from it');
  t.equal(new MigrationStore(db).switchoverOverhead('hostB', 'hostA'), undefined, 'per direction');
});

t.test('pre-copy: a failing round rolls back without freezing', async (t) => {
  const a = await fakeAgent(t, 'hostA', { fail: { round: { status: 422, error: 'precopy-round', message: 'page stream broke' } } });
  const b = await fakeAgent(t, 'hostB');
  const { coordinator } = coordinatorOn(t, join(tempDir(t), 'c.db'), [a.host, b.host]);
  const rec = await coordinator.settled(coordinator.create({ from: 'hostA', to: 'hostB', pid: 42, mode: 'precopy' }).id);
  t.equal(rec.state, 'failed');
  t.match(rec.failure, { kind: 'engine', phase: 'precopy' });
  t.same(a.steps(), ['check', 'kernel', 'precopy', 'round', 'abort']);
  t.same(b.steps(), ['prepare', 'abort']);
});

t.test('abort during the switchover: both agents told, record aborted, too late after commit', async (t) => {
  const a = await fakeAgent(t, 'hostA', { delay: { source: 500 } });
  const b = await fakeAgent(t, 'hostB');
  const { coordinator } = coordinatorOn(t, join(tempDir(t), 'c.db'), [a.host, b.host]);
  const rec = coordinator.create({ from: 'hostA', to: 'hostB', pid: 42, mode: 'cold' });
  await waitFor('switchover', () => coordinator.get(rec.id).state === 'switchover');
  const aborted = await coordinator.abort(rec.id);
  t.equal(aborted.state, 'aborted');
  t.equal(aborted.abortRequested, true);
  t.match(aborted.failure, { kind: 'aborted', phase: 'switchover' });
  t.notOk(b.steps().includes('restore'), 'never restored');
  t.ok(a.steps().includes('abort') && b.steps().includes('abort'));
  const firstAbortDst = [...b.calls].findIndex((c) => c.step === 'abort');
  t.ok(firstAbortDst >= 0);
  await t.rejects(coordinator.abort(rec.id), { statusCode: 409 });

  const c2 = await coordinator.settled(coordinator.create({ from: 'hostA', to: 'hostB', pid: 43, mode: 'cold' }).id);
  t.equal(c2.state, 'done');
  await t.rejects(coordinator.abort(c2.id), { statusCode: 409, code: 'finished' });
});

t.test('WebSocket: live phases in order, then replay after the end; /events sees everything', async (t) => {
  const a = await fakeAgent(t, 'hostA', { delay: { source: 150, restore: 0 } });
  const b = await fakeAgent(t, 'hostB', { delay: { restore: 150 } });
  const c = coordinatorOn(t, join(tempDir(t), 'c.db'), [a.host, b.host], { listen: true });
  const base = (await c.listening).replace('http', 'ws');
  const collect = (url: string, until: (e: MigrationEvent[]) => boolean) =>
    new Promise<MigrationEvent[]>((resolve, reject) => {
      const got: MigrationEvent[] = [];
      const ws = new WebSocket(url, { headers: auth });
      ws.on('message', (m) => {
        got.push(JSON.parse(m.toString()));
        if (until(got)) ws.close();
      });
      ws.on('close', () => resolve(got));
      ws.on('error', reject);
    });
  const all = collect(`${base}/events`, (got) => got.some((e) => e.type === 'result'));
  await new Promise((r) => setTimeout(r, 100));
  const rec = c.coordinator.create({ from: 'hostA', to: 'hostB', pid: 42, mode: 'cold' });
  const live = await collect(`${base}/migrations/${rec.id}/events`, () => false);
  t.same(phasesOf(live), PHASES, 'every phase, in order');
  t.equal(live.at(-1)!.type, 'result', 'the server closes after the result');
  t.same(live.map((e) => e.seq), live.map((_, i) => i + 1), 'no event lost or repeated between replay and live');
  const replay = await collect(`${base}/migrations/${rec.id}/events`, () => false);
  t.same(replay, live, 'after the end: the same events, replayed');
  t.same(phasesOf(await all), PHASES, '/events');

  const unknown = await new Promise<number>((resolve) => {
    const ws = new WebSocket(`${base}/migrations/mnope/events`, { headers: auth });
    ws.on('unexpected-response', (_q, res) => {
      resolve(res.statusCode ?? 0);
      ws.terminate();
    });
    ws.on('error', () => {});
  });
  t.equal(unknown, 404);
  const noToken = await new Promise<number>((resolve) => {
    const ws = new WebSocket(`${base}/migrations/${rec.id}/events`);
    ws.on('unexpected-response', (_q, res) => {
      resolve(res.statusCode ?? 0);
      ws.terminate();
    });
    ws.on('error', () => {});
  });
  t.equal(noToken, 401);
});

t.test('restart recovery from SQLite (scripted agents)', async (t) => {
  const dir = tempDir(t);
  const db = join(dir, 'c.db');
  const a = await fakeAgent(t, 'hostA');
  const b = await fakeAgent(t, 'hostB');
  // Records as a crashed coordinator would have left them: one before the commit point, one after.
  const store = new MigrationStore(db);
  const owner = { pid: 2147483000, start: null, instance: 'dead' };
  const before = store.insert({ id: 'mbefore', from: 'hostA', to: 'hostB', pid: 50, mode: 'cold', maxDowntimeMs: null, bandwidth: null }, owner);
  store.setState(before.id, 'restoring');
  const after = store.insert({ id: 'mafter', from: 'hostA', to: 'hostB', pid: 51, mode: 'cold', maxDowntimeMs: null, bandwidth: null }, owner);
  store.setState(after.id, 'restoring');
  t.ok(store.markCommitted(after.id, { ...after.stats, restoredPid: 51 }));
  store.setState(after.id, 'postcopy');
  store.close();
  a.state.set('mafter', 'dumped');
  b.state.set('mafter', 'restored');
  a.state.set('mbefore', 'dumped');

  const { coordinator, app } = coordinatorOn(t, db, [a.host, b.host]);
  await app.ready();
  await coordinator.idle();
  const rb = coordinator.get('mbefore');
  t.equal(rb.state, 'aborted', 'before the commit point → aborted');
  t.match(rb.failure, { kind: 'aborted', message: /restarted during restoring/ });
  t.equal(coordinator.get('mafter').state, 'done', 'after the commit point → done');
  t.same(a.calls.filter((c) => c.id === 'mbefore').map((c) => c.step), ['abort']);
  t.same(b.calls.filter((c) => c.id === 'mbefore').map((c) => c.step), ['abort'], 'destination told too (404: it held nothing)');
  t.same(a.calls.filter((c) => c.id === 'mafter').map((c) => c.step), ['commit'], 'the original killed');
  t.same(b.calls.filter((c) => c.id === 'mafter').map((c) => c.step), ['commit']);
  const text = await coordinator.metrics.registry.metrics();
  t.match(text, /tern_recoveries_total\{result="aborted"\} 1/);
  t.match(text, /tern_recoveries_total\{result="done"\} 1/);
});

t.test('recovery retries an agent that is down until it answers', async (t) => {
  const dir = tempDir(t);
  const db = join(dir, 'c.db');
  const a = await fakeAgent(t, 'hostA', { fail: { abort: { status: 503, error: 'down', message: 'agent restarting' } } });
  const b = await fakeAgent(t, 'hostB');
  const store = new MigrationStore(db);
  store.insert({ id: 'mretry', from: 'hostA', to: 'hostB', pid: 60, mode: 'cold', maxDowntimeMs: null, bandwidth: null }, { pid: 2147483000, start: null, instance: 'dead' });
  store.setState('mretry', 'switchover');
  store.close();
  const { coordinator, app } = coordinatorOn(t, db, [a.host, b.host]);
  const ready = app.ready();
  await waitFor('retries', () => a.steps().filter((s) => s === 'abort').length >= 3);
  t.equal(coordinator.get('mretry').state, 'switchover', 'not recorded aborted while the source has not confirmed');
  delete a.script.fail;
  await ready;
  await coordinator.idle();
  t.equal(coordinator.get('mretry').state, 'aborted');
  t.ok(coordinator.events('mretry').some((e) => /retrying/.test(e.message)));
});

t.test('a live instance in the same process keeps its migrations; a closed one hands them over', async (t) => {
  const dir = tempDir(t);
  const db = join(dir, 'c.db');
  const a = await fakeAgent(t, 'hostA', { delay: { source: 400 } });
  const b = await fakeAgent(t, 'hostB');
  const first = coordinatorOn(t, db, [a.host, b.host]);
  await first.app.ready();
  const rec = first.coordinator.create({ from: 'hostA', to: 'hostB', pid: 70, mode: 'cold' });
  const second = coordinatorOn(t, db, [a.host, b.host]);
  await second.app.ready();
  t.equal(second.coordinator.get(rec.id).state, 'checking', 'not taken over from a live owner');
  t.equal((await first.coordinator.settled(rec.id)).state, 'done');
  t.ok(token);
});
