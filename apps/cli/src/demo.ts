#!/usr/bin/env node
/**
 * `npm run demo`: a lab of two hosts plus a client, a Tern agent in each host, a live redis-server
 * on hostA with a dataset, `migrate check` on it, then one pre-copy migration to hostB through
 * `migrate --lab` (an embedded coordinator driving the two agents) while 20 redis-benchmark
 * clients and one counting client stay connected: their TCP connections move with the process
 * (TCP repair), the service address moves with it, and the counting client reports the longest
 * pause it saw. The report is printed.
 *
 *   npm run demo            run and clean up
 *   npm run demo -- --keep  leave the lab and its agents running and print how to reach them
 */
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { Lab } from '@tern/lab';

const { values } = parseArgs({ options: { keep: { type: 'boolean' } } });
const cli = fileURLToPath(new URL('./main.js', import.meta.url));
const say = (s: string) => process.stdout.write(`${s}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One RESP connection doing INCR demo:counter until the stop file exists; prints a JSON report. */
const COUNTING_CLIENT = `
const net = require('node:net'), fs = require('node:fs');
const [host, stop] = process.argv.slice(1);
const s = net.connect(6379, host);
let buf = '', last = null, replies = 0, maxGapMs = 0, t = performance.now(), error = null;
const send = () => s.write('*2\\r\\n$4\\r\\nINCR\\r\\n$12\\r\\ndemo:counter\\r\\n');
const end = () => { console.log(JSON.stringify({ replies, maxGapMs, error })); s.destroy(); };
s.on('connect', send);
s.on('error', (e) => { error = e.message; end(); });
s.on('data', (d) => {
  buf += d;
  let i;
  while ((i = buf.indexOf('\\r\\n')) >= 0) {
    const line = buf.slice(0, i); buf = buf.slice(i + 2);
    const v = Number(line.slice(1));
    if (line[0] !== ':' || (last !== null && v !== last + 1)) { error = 'reply ' + line + ' after ' + last; return end(); }
    last = v; replies++;
    const now = performance.now(); maxGapMs = Math.max(maxGapMs, now - t); t = now;
    if (fs.existsSync(stop)) return end();
    send();
  }
});
`;

if (process.getuid?.() !== 0) {
  process.stderr.write('demo: must run as root (namespaces, ptrace)\n');
  process.exit(2);
}

const lab = await Lab.create({ hosts: 2, owned: !values.keep });
try {
  say(`lab ${lab.name}: ${lab.info.hosts.map((h) => `${h.name} ${h.address}`).join(', ')}, client ${lab.info.client.address}, service address ${lab.info.serviceAddress} on ${lab.info.serviceHost}`);
  await lab.startAgents();
  say('a Tern agent runs in every host');

  const svc = lab.info.serviceAddress;
  const redisCli = async (...args: string[]) => (await lab.run('client', ['redis-cli', '-h', svc, ...args])).stdout.trim();
  const dir = mkdtempSync(join(tmpdir(), 'tern-demo-'));
  const redis = await lab.startDaemon('hostA', [
    'redis-server', '--port', '6379', '--bind', '0.0.0.0', '--protected-mode', 'no', '--save', '', '--appendonly', 'no',
    '--enable-debug-command', 'yes', '--dir', dir,
  ], { logFile: join(dir, 'redis.log') });
  for (let i = 0; (await redisCli('PING')) !== 'PONG'; i++) {
    if (i > 100) throw new Error('redis-server did not answer');
    await sleep(50);
  }
  await redisCli('DEBUG', 'POPULATE', '100000', 'key', '128');
  const warmup = await lab.run('client', ['redis-benchmark', '-h', svc, '-c', '20', '-n', '50000', '-t', 'set,get', '-r', '100000', '-q']);
  say(`redis-server on hostA (pid ${redis.pid} there), 100000 keys; clients ran:\n${warmup.stdout.replace(/\r/g, '\n').split('\n').filter((l) => /per second/.test(l)).map((l) => `  ${l.trim()}`).join('\n')}`);
  const dbsize = await redisCli('DBSIZE');
  const digest = await redisCli('DEBUG', 'DIGEST');
  say(`DBSIZE ${dbsize}, DEBUG DIGEST ${digest}`);

  say(`\n$ lab exec ${lab.name} hostA -- migrate check --pid ${redis.pid}`);
  const check = await lab.run('hostA', [process.execPath, cli, 'check', '--pid', String(redis.pid)]);
  process.stdout.write(check.stdout.split('\n').filter((l) => /^pid|resident|threads \(|memory mappings \(|file descriptors \(|movable/.test(l)).join('\n') + '\n');

  // Clients that stay connected through the move: 20 benchmark connections reading in a loop, and
  // one connection doing INCR, which checks that the counter never skips and times the longest gap.
  const bench = lab.spawn('client', ['redis-benchmark', '-h', svc, '-c', '20', '-t', 'get', '-r', '100000', '-l', '-q'], { stdio: 'ignore' });
  const stopFile = join(dir, 'stop-counting');
  const counting = lab.run('client', [process.execPath, '-e', COUNTING_CLIENT, svc, stopFile], { timeoutMs: 600_000 });
  await sleep(1500);
  say(`\n${(await redisCli('INFO', 'clients')).match(/connected_clients:\d+/)?.[0]} (20 redis-benchmark connections + 1 counting INCR + this redis-cli)`);

  // The default mode (hybrid): pre-copy rounds, a freeze for the state only, the last dirty pages pulled after the resume.
  say(`\n$ migrate --lab ${lab.name} --from hostA --to hostB --pid ${redis.pid}`);
  const migrate = await lab.run('client', [process.execPath, cli, '--lab', lab.name, '--from', 'hostA', '--to', 'hostB', '--pid', String(redis.pid)], { timeoutMs: 180_000 });
  process.stdout.write(migrate.stdout + migrate.stderr);
  if (migrate.code !== 0) throw new Error(`migrate exited ${migrate.code}`);

  await sleep(1500);
  writeFileSync(stopFile, '');
  const counted = JSON.parse((await counting).stdout.trim() || '{}') as { replies?: number; maxGapMs?: number; error?: string };
  const benchAlive = bench.exitCode === null && bench.signalCode === null;
  bench.kill('SIGINT');
  say(`counting client: ${counted.replies ?? 0} INCR replies over one connection, counter continuous: ${counted.error ? `NO (${counted.error})` : 'yes'}; longest pause between replies ${counted.maxGapMs?.toFixed(1)} ms`);
  say(`redis-benchmark's 20 connections: ${benchAlive ? 'still running, no error' : 'FAILED'}`);
  const where = (await lab.run('hostB', ['ip', '-4', '-o', 'addr', 'show', 'eth0'])).stdout.includes(`${svc}/32`) ? 'hostB' : 'not hostB';
  say(`service address ${svc} is now on ${where} (moved by the agents at switchover)`);
  await redisCli('DEL', 'demo:counter');
  const onB = (await lab.run('hostB', ['sh', '-c', `test -d /proc/${redis.pid} && cat /proc/${redis.pid}/comm`])).stdout.trim();
  const onA = (await lab.run('hostA', ['sh', '-c', `test -d /proc/${redis.pid} && echo present || echo gone`])).stdout.trim();
  const dbsizeB = await redisCli('DBSIZE');
  const digestB = await redisCli('DEBUG', 'DIGEST');
  say(`hostB pid ${redis.pid}: ${onB}; hostA pid ${redis.pid}: ${onA}`);
  say(`DBSIZE ${dbsizeB}, DEBUG DIGEST ${digestB} — ${dbsizeB === dbsize && digestB === digest ? 'identical' : 'DIFFERENT'}`);
  const bench2 = await lab.run('client', ['redis-benchmark', '-h', svc, '-c', '20', '-n', '50000', '-t', 'get', '-r', '100000', '-q']);
  say(`clients on hostB:\n${bench2.stdout.replace(/\r/g, '\n').split('\n').filter((l) => /per second/.test(l)).map((l) => `  ${l.trim()}`).join('\n')}`);
  if (dbsizeB !== dbsize || digestB !== digest || onB !== 'redis-server' || onA !== 'gone' || counted.error || !benchAlive) process.exitCode = 1;

  if (values.keep) {
    const agents = lab.agents();
    say(`\nthe lab is left running. try:\n  deploy/lab/lab exec ${lab.name} client -- redis-cli -h ${svc} DBSIZE\n  deploy/lab/lab exec ${lab.name} client -- migrate --lab ${lab.name} --from hostB --to hostA --pid ${redis.pid}`);
    for (const [host, a] of Object.entries(agents?.hosts ?? {})) say(`  agent ${host}: ${a.url} (API, /metrics; cluster token in ${a.config})`);
    say(`  deploy/lab/lab down ${lab.name}`);
  }
} finally {
  if (!values.keep) await lab.destroy();
}
