// The engine freezes a live redis-server (Debian package, started by the test inside a lab host)
// for 100 ms, 50 times, while redis-benchmark runs against it from the client namespace, and thaws
// it each time. Outcome a user cares about: the benchmark sees zero errors, the keyspace is
// unchanged, and the server saw no signal it did not already have.
import t from 'tap';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Tracer } from '@tern/native';
import { labFor, redisCli, signalState, sleep, waitFor } from './helpers.js';

const PORT = 6379;

t.test('50 freezes of a loaded redis-server under redis-benchmark', async (t) => {
  const lab = await labFor(t, 1);
  const dir = mkdtempSync(join(tmpdir(), 'tern-redis-'));
  const log = join(dir, 'redis.log');
  const server = await lab.startDaemon('hostA', [
    'redis-server', '--port', String(PORT), '--bind', '0.0.0.0', '--protected-mode', 'no',
    '--save', '', '--appendonly', 'no', '--enable-debug-command', 'yes', '--logfile', log, '--dir', dir,
  ]);
  const addr = lab.info.serviceAddress;
  await waitFor('redis to answer PING', async () => (await redisCli(lab, 'client', addr, PORT, ['PING'])) === 'PONG');
  await redisCli(lab, 'client', addr, PORT, ['DEBUG', 'POPULATE', '50000', 'key', '64']);
  const dbsize = await redisCli(lab, 'client', addr, PORT, ['DBSIZE']);
  const digest = await redisCli(lab, 'client', addr, PORT, ['DEBUG', 'DIGEST']);
  t.equal(dbsize, '50000', 'dataset loaded');
  const signalsBefore = signalState(server.rootPid);

  // Read-only load (GET/PING) so that the keyspace digest must stay identical.
  let benchmarking = true;
  const benchmarkRuns: { code: number | null; out: string }[] = [];
  const benchmarks = (async () => {
    while (benchmarking) {
      const r = await lab.run('client', [
        'redis-benchmark', '-h', addr, '-p', String(PORT), '-c', '20', '-n', '100000', '-t', 'ping,get', '-r', '50000', '-q',
      ], { timeoutMs: 120_000 });
      benchmarkRuns.push({ code: r.code, out: r.stdout + r.stderr });
    }
  })();

  const tracer = Tracer.open(server.rootPid);
  t.teardown(() => tracer.close());
  const frozenMs: number[] = [];
  for (let i = 0; i < 50; i++) {
    const freeze = await tracer.freeze();
    t.equal(freeze.threads.length, 5, 'every redis thread stopped (main, 3 bio, jemalloc)');
    const t0 = process.hrtime.bigint();
    await sleep(100);
    await tracer.thaw();
    frozenMs.push(Number(process.hrtime.bigint() - t0) / 1e6);
    await sleep(20);
  }
  benchmarking = false;
  await benchmarks;

  t.ok(benchmarkRuns.length >= 1, `redis-benchmark ran ${benchmarkRuns.length} time(s) across the freezes`);
  for (const run of benchmarkRuns) {
    t.equal(run.code, 0, 'redis-benchmark exited 0');
    t.notMatch(run.out, /error|reset|refused|timeout/i, 'redis-benchmark reported no error');
  }
  t.equal(await redisCli(lab, 'client', addr, PORT, ['DBSIZE']), dbsize, 'DBSIZE unchanged');
  t.equal(await redisCli(lab, 'client', addr, PORT, ['DEBUG', 'DIGEST']), digest, 'DEBUG DIGEST unchanged');
  t.same(signalState(server.rootPid), signalsBefore, 'no signal pending, blocked or caught differently');
  t.notMatch(readFileSync(log, 'utf8'), /signal|SIG[A-Z]+/, 'redis logged no signal');
  // Node timers may fire up to a millisecond early; the freeze is held for the sleep plus the thaw.
  t.ok(Math.min(...frozenMs) >= 99, 'each freeze lasted the ~100 ms asked for');
});
