// A coordinator restart with real agents: a migration recorded in 'switchover' (before the commit
// point) by an instance that is gone is resolved by the next instance over the same SQLite file to
// 'aborted' — both agents told to abort, destination first — and the process lives on at the source.
import t from 'tap';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { auth, coordinatorOn, realAgent, tempDir } from './helpers.js';

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

t.test('restart before the commit point → aborted, process alive on the source', async (t) => {
  const a = await realAgent(t, 'hostA');
  const b = await realAgent(t, 'hostB');
  const child = spawn('sleep', ['120'], { stdio: 'ignore' });
  t.teardown(() => child.kill('SIGKILL'));
  const pid = child.pid!;

  const check = await a.app.inject({ method: 'POST', url: '/v1/check', headers: auth, payload: { pid } });
  t.equal(check.json().report.movable, true, 'the agent checks the real process: movable');

  const db = join(tempDir(t), 'coordinator.db');
  const first = coordinatorOn(t, db, [a.host, b.host]);
  await first.app.ready();
  const rec = first.coordinator.store.insert({ id: 'minterrupted', from: 'hostA', to: 'hostB', pid, mode: 'cold', maxDowntimeMs: null, bandwidth: null }, first.coordinator.owner);
  first.coordinator.store.setState(rec.id, 'switchover');
  await first.app.close(); // the instance is gone with the migration mid-switchover

  const second = coordinatorOn(t, db, [a.host, b.host]);
  await second.app.ready();
  await second.coordinator.idle();
  const after = second.coordinator.get(rec.id);
  t.equal(after.state, 'aborted');
  t.equal(after.committed, false);
  t.match(after.failure, { kind: 'aborted', phase: 'switchover', message: /restarted during switchover, before the commit point/ });
  t.ok(b.calls.includes(`POST /v1/migrations/${rec.id}/abort`), 'destination told to abort');
  t.ok(a.calls.includes(`POST /v1/migrations/${rec.id}/abort`), 'source told to abort');
  t.ok(alive(pid), 'the process is alive on the source');
  const events = second.coordinator.events(rec.id);
  t.match(events.map((e) => e.message).join('\n'), /coordinator restarted with this migration in switchover \(before the commit point\)/);
  t.equal(events.at(-1)!.type, 'result');

  const third = coordinatorOn(t, db, [a.host, b.host]);
  await third.app.ready();
  t.equal(third.coordinator.get(rec.id).state, 'aborted', 'resolved once: a later restart leaves it as it is');
});
