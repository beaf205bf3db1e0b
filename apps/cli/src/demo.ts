#!/usr/bin/env node
/**
 * `npm run demo`: a lab of two hosts plus a client, a live redis-server on hostA with clients
 * attached, then `migrate check` on it from inside hostA, and ten freeze/thaw cycles of the live
 * server through the engine while the clients keep going. Live migration itself arrives with the
 * migration engine; the demo grows with it.
 *
 *   npm run demo            run and clean up
 *   npm run demo -- --keep  leave the lab running and print how to reach it
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { Lab } from '@tern/lab';
import { Tracer } from '@tern/native';

const { values } = parseArgs({ options: { keep: { type: 'boolean' } } });
const cli = fileURLToPath(new URL('./main.js', import.meta.url));
const say = (s: string) => process.stdout.write(`${s}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

if (process.getuid?.() !== 0) {
  process.stderr.write('demo: must run as root (namespaces, ptrace)\n');
  process.exit(2);
}

const lab = await Lab.create({ hosts: 2, owned: !values.keep });
try {
  say(`lab ${lab.name}: ${lab.info.hosts.map((h) => `${h.name} ${h.address}`).join(', ')}, client ${lab.info.client.address}, service address ${lab.info.serviceAddress} on ${lab.info.serviceHost}`);
  const dir = mkdtempSync(join(tmpdir(), 'tern-demo-'));
  const redis = await lab.startDaemon('hostA', [
    'redis-server', '--port', '6379', '--bind', '0.0.0.0', '--protected-mode', 'no', '--save', '', '--appendonly', 'no', '--enable-debug-command', 'yes', '--dir', dir,
  ], { logFile: join(dir, 'redis.log') });
  say(`redis-server started on hostA: pid ${redis.pid} there (${redis.rootPid} on this machine)`);
  for (let i = 0; ; i++) {
    const r = await lab.run('client', ['redis-cli', '-h', lab.info.serviceAddress, 'PING']);
    if (r.stdout.trim() === 'PONG') break;
    if (i > 100) throw new Error('redis-server did not answer');
    await sleep(50);
  }
  await lab.run('client', ['redis-cli', '-h', lab.info.serviceAddress, 'DEBUG', 'POPULATE', '100000', 'key', '128']);
  say('loaded 100000 keys; starting redis-benchmark from the client namespace (live clients attached)');
  const bench = lab.spawn('client', ['redis-benchmark', '-h', lab.info.serviceAddress, '-c', '20', '-n', '400000', '-t', 'get,ping', '-q'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let benchOut = '';
  bench.stdout?.on('data', (d: Buffer) => (benchOut += d.toString()));
  bench.stderr?.on('data', (d: Buffer) => (benchOut += d.toString()));

  say(`\n$ lab exec ${lab.name} hostA -- migrate check --pid ${redis.pid}`);
  const check = await lab.run('hostA', [process.execPath, cli, 'check', '--pid', String(redis.pid)]);
  process.stdout.write(check.stdout + check.stderr);

  say('\nfreezing the live server 10 times for 20 ms each while the clients run:');
  const tracer = Tracer.open(redis.rootPid);
  const freezeMs: number[] = [];
  const thawMs: number[] = [];
  try {
    for (let i = 0; i < 10; i++) {
      const f = await tracer.freeze();
      await sleep(20);
      const th = await tracer.thaw();
      freezeMs.push(f.elapsedNs / 1e6);
      thawMs.push(th.elapsedNs / 1e6);
      await sleep(50);
    }
  } finally {
    await tracer.close();
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;
  say(`  stop all 5 threads: median ${median(freezeMs).toFixed(3)} ms; put back and resume: median ${median(thawMs).toFixed(3)} ms`);
  await new Promise<void>((resolve) => (bench.exitCode !== null ? resolve() : bench.on('close', () => resolve())));
  say(`redis-benchmark (exit ${bench.exitCode}):\n${benchOut.replace(/\r/g, '\n').split('\n').filter((l) => /requests per second/.test(l)).map((l) => `  ${l.trim()}`).join('\n')}`);
  const errors = /error|reset|refused/i.test(benchOut);
  say(errors ? 'the clients saw errors' : 'the clients saw no error');

  if (values.keep) {
    say(`\nthe lab is left running. try:\n  deploy/lab/lab exec ${lab.name} hostA -- migrate check --pid ${redis.pid}\n  deploy/lab/lab exec ${lab.name} client -- redis-cli -h ${lab.info.serviceAddress} DBSIZE\n  deploy/lab/lab down ${lab.name}`);
  }
  if (errors || bench.exitCode !== 0) process.exitCode = 1;
} finally {
  if (!values.keep) await lab.destroy();
}
