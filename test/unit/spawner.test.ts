// The agent's command spawner (apps/agent/src/spawner.ts), with real processes: it runs commands
// like execFile does (output, failures, stdin, a missing binary, a timeout), survives its child's
// death, leaves nothing behind when closed, and, the point of it, stays fast while the process
// that uses it holds a lot of memory (forking that process is what it avoids).
import t from 'tap';
import { fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { CommandSpawner, runDirect, type CommandError } from '@tern/agent';

const childScript = fileURLToPath(new URL('../../apps/agent/dist/spawner-child.js', import.meta.url));

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code !== 'ESRCH';
  }
};

const gone = async (pid: number, ms = 3000) => {
  const end = Date.now() + ms;
  while (alive(pid) && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
  return !alive(pid);
};

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

t.test('runs commands like execFile', async (t) => {
  const s = new CommandSpawner();
  t.teardown(() => s.close());
  t.equal(await s.start(), true, 'started');
  t.type(s.pid, 'number');

  t.same(await s.run('sh', ['-c', 'echo out; echo err >&2']), { stdout: 'out\n', stderr: 'err\n' }, 'stdout and stderr');

  const failed = (await s.run('sh', ['-c', 'echo partial; echo broken >&2; exit 3']).catch((e: unknown) => e)) as CommandError;
  t.type(failed, Error);
  t.equal(failed.code, 3, 'exit code');
  t.equal(failed.signal, null);
  t.equal(failed.stdout, 'partial\n');
  t.equal(failed.stderr, 'broken\n');
  t.match(failed.message, /^Command failed: sh -c .*exit 3\nbroken\n$/s, 'message names the command and has its stderr');
  // Same error as promisified execFile's, property for property.
  const direct = (await runDirect('sh', ['-c', 'echo partial; echo broken >&2; exit 3']).catch((e: unknown) => e)) as CommandError;
  for (const k of ['message', 'code', 'signal', 'killed', 'cmd', 'stdout', 'stderr'] as const) t.same(failed[k], direct[k], `same ${k} as execFile`);

  t.same(await s.run('cat', [], { input: 'through stdin\n' }), { stdout: 'through stdin\n', stderr: '' }, 'input reaches stdin');
  t.same(await s.run('sh', ['-c', 'head -c 3'], { input: 'x'.repeat(1 << 20) }), { stdout: 'xxx', stderr: '' }, 'input the command does not read');

  const missing = (await s.run('/nonexistent/tern-no-such-binary', ['a']).catch((e: unknown) => e)) as CommandError;
  t.equal(missing.code, 'ENOENT', 'a missing binary rejects with ENOENT');
  t.match(missing.message, /ENOENT/);
  t.equal(missing.syscall, 'spawn /nonexistent/tern-no-such-binary');

  t.same(await s.run('sh', ['-c', 'echo "$TERN_X"'], { env: { PATH: process.env['PATH'], TERN_X: 'from the agent' } }), { stdout: 'from the agent\n', stderr: '' }, 'env');

  const big = await s.run('head', ['-c', String(4 << 20), '/dev/zero'], { maxBuffer: 8 << 20 });
  t.equal(big.stdout.length, 4 << 20, 'large output travels back');
  const over = (await s.run('head', ['-c', String(64 << 10), '/dev/zero'], { maxBuffer: 1024 }).catch((e: unknown) => e)) as CommandError;
  t.equal(over.code, 'ERR_CHILD_PROCESS_STDIO_MAXBUFFER', 'maxBuffer like execFile');

  const nul = (await s.run('echo', ['a\0b']).catch((e: unknown) => e)) as CommandError;
  t.type(nul, Error, 'arguments execFile refuses reject (and the spawner lives on)');
  t.same(await s.run('echo', ['still here']), { stdout: 'still here\n', stderr: '' });

  const many = await Promise.all(Array.from({ length: 20 }, (_, i) => s.run('echo', [String(i)])));
  t.same(many.map((r) => r.stdout), Array.from({ length: 20 }, (_, i) => `${i}\n`), 'concurrent commands get their own answers');
  t.equal(s.starts, 1, 'one spawner all along');
  t.equal(s.fallbacks, 0);
});

t.test('a timeout kills the command and rejects', async (t) => {
  const s = new CommandSpawner();
  t.teardown(() => s.close());
  const started = Date.now();
  const err = (await s.run('sh', ['-c', 'echo $$; exec sleep 30'], { timeoutMs: 300 }).catch((e: unknown) => e)) as CommandError;
  t.ok(Date.now() - started < 5000, 'rejected at the deadline');
  t.type(err, Error);
  t.equal(err.killed, true);
  t.equal(err.signal, 'SIGTERM');
  t.equal(err.code, null);
  const pid = Number(err.stdout.trim());
  t.ok(pid > 0, 'the command told its pid');
  t.ok(await gone(pid), 'the command is gone');
});

t.test('the spawner dying: in-flight commands reject, the next run starts a new one', async (t) => {
  const s = new CommandSpawner();
  t.teardown(() => s.close());
  await s.start();
  const first = s.pid!;
  const inFlight = s.run('sleep', ['2']).catch((e: unknown) => e);
  await new Promise((r) => setTimeout(r, 100)); // sent and running
  process.kill(first, 'SIGKILL'); // ours: started above
  const started = Date.now();
  const err = (await inFlight) as Error;
  t.type(err, Error, 'the in-flight command rejected');
  t.match(err.message, /command spawner.*killed by SIGKILL.*in flight/);
  t.ok(Date.now() - started < 1000, 'at once');
  t.same(await s.run('echo', ['again']), { stdout: 'again\n', stderr: '' }, 'the next command works');
  t.not(s.pid, first, 'through a new spawner');
  t.equal(s.starts, 2);
  t.ok(await gone(first));
});

t.test('close() leaves no child process; later commands run directly', async (t) => {
  const s = new CommandSpawner();
  await s.run('true', []);
  const pid = s.pid!;
  t.ok(alive(pid));
  const inFlight = s.run('sleep', ['2']).catch((e: unknown) => e);
  await new Promise((r) => setTimeout(r, 50));
  await s.close();
  t.notOk(alive(pid), 'the spawner exited (and was reaped) when close() resolved');
  t.match(((await inFlight) as Error).message, /closed/, 'a command in flight rejects');
  t.equal(s.pid, null);
  t.same(await s.run('echo', ['direct']), { stdout: 'direct\n', stderr: '' });
  t.equal(s.starts, 1, 'no new spawner after close');
});

t.test('a spawner that cannot start: commands run directly', async (t) => {
  const logs: string[] = [];
  const s = new CommandSpawner({ childPath: '/nonexistent/spawner-child.js', log: (m) => logs.push(m) });
  t.teardown(() => s.close());
  t.equal(await s.start(), false);
  t.same(await s.run('echo', ['anyway']), { stdout: 'anyway\n', stderr: '' });
  t.equal(s.fallbacks, 1, 'counted');
  t.match(logs.join('\n'), /could not start the command spawner[\s\S]*running echo directly/, 'and logged');
});

t.test('the child: validates requests, exits with its channel', async (t) => {
  const child = fork(childScript, [], { serialization: 'advanced', stdio: ['ignore', 'pipe', 'pipe', 'ipc'], execArgv: [] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d) => (stdout += d));
  child.stderr!.on('data', (d) => (stderr += d));
  const messages: unknown[] = [];
  const next = () => new Promise<unknown>((resolve) => child.once('message', resolve));
  child.on('message', (m) => messages.push(m));
  t.match(await next(), { ready: true, pid: child.pid });
  for (const junk of ['junk', null, [1], { id: -1, file: 'echo', args: [] }]) child.send(junk);
  child.send({ id: 7, file: 'echo', args: [1, 2] });
  t.match(await next(), { id: 7, code: 'EINVAL', error: { message: /args is not an array of strings/ } }, 'a bad request with an id is answered');
  child.send({ id: 8, file: 'echo', args: ['ok'], env: { A: 1 } });
  t.match(await next(), { id: 8, code: 'EINVAL', error: { message: /env/ } });
  child.send({ id: 9, file: 'echo', args: ['ok'] });
  t.same(await next(), { id: 9, code: 0, signal: null, stdout: 'ok\n', stderr: '' }, 'and it still works');
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  child.disconnect();
  t.equal(await exited, 0, 'exits when its channel closes');
  t.equal(stdout, '', 'never writes to stdout');
  t.match(stderr, /malformed request/, 'complains on stderr');
  t.equal(messages.length, 4, 'nothing answered for requests without an id (ready, 7, 8, 9)');
});

t.test('stays fast while this process holds 1 GiB', async (t) => {
  const s = new CommandSpawner();
  t.teardown(() => s.close());
  await s.start(); // while small, as the agent does
  await s.run('true', []);
  let held: Buffer[] | null = [];
  for (let i = 0; i < 16; i++) held.push(Buffer.allocUnsafeSlow(64 << 20).fill(i + 1)); // touched: mapped for real
  const viaSpawner: number[] = [];
  const direct: number[] = [];
  for (let i = 0; i < 5; i++) {
    let t0 = performance.now();
    await s.run('true', []);
    viaSpawner.push(performance.now() - t0);
    t0 = performance.now();
    await runDirect('true', []);
    direct.push(performance.now() - t0);
  }
  t.equal(held.length, 16);
  held = null; // freed at the next collection
  // Measured here (2 CPUs, THP madvise), median of 5 with 1 GiB held: spawner 6-7 ms under tap
  // (2-3 ms from a plain node, as with nothing held), direct execFile 44-52 ms (the fork copying
  // this process's page tables; ~85 ms with 2 GiB).
  t.comment(`median of 5 runs of true with 1 GiB held: spawner ${median(viaSpawner).toFixed(1)} ms, direct ${median(direct).toFixed(1)} ms`);
  t.ok(median(viaSpawner) < median(direct) / 2, 'the spawner is not slowed down by the memory this process holds');
});
