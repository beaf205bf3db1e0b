// The address handoff inside the downtime, with and without the agent's command spawner, end to end
// through two labs, their agents and the CLI (`migrate --lab NAME --mode precopy --json`).
//
// The destination agent claims the service address (10.77.0.200/32, the lab's; `ip route get` +
// `ip addr add`) between the restore request and the engine's restore, i.e. inside the downtime,
// while it holds every pre-copied page. Run straight from the agent, each command forks the whole
// agent (page tables of a gigabyte and more); run through the spawner (apps/agent/src/spawner.ts),
// it forks a small child. Two labs up side by side, same machine, same time: one whose agents run
// with the spawner (the default) and one whose agents run with TERN_AGENT_COMMAND_SPAWNER=0 in their
// environment (the lab's agents inherit this process's environment when started). In each, a
// redis-server on hostA (serving on every address, so the service address moves with it) is filled
// with ~1 GiB (DEBUG POPULATE 4000000 key 200) and moved hostA → hostB → hostA in pre-copy mode
// TERN_BENCH_RUNS (default 3) times, the two labs' moves interleaved one at a time (the order flips
// each step). Correct or worthless: after every move redis must run on the destination (and not the
// source), the service address must be on the destination's eth0 only, and DBSIZE from the client
// namespace through the service address must be what it was; at the end, DEBUG DIGEST too.
// Figures: the record's downtime (stats.downtimeMs) per variant and their ratio (pairwise, same
// step); and the destination agent's own time from the restore request to the engine's restore call
// (its log line "restore call X ms ... since the request Z ms": Z − X, which is the image decode plus
// the address claim). Warm-up, not counted: one round trip of the still empty redis in each lab.
// About 2-3 minutes on the 2-core machine.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Lab } from '@tern/lab';
import { row, median } from './stats.mjs';
import { cli, sleep } from './lab-runs.mjs';

export const name = 'handoff';
const RUNS = Number(process.env.TERN_BENCH_RUNS ?? 3); // round trips (each: hostA → hostB, hostB → hostA)
const KEYS = 4_000_000;
const VALUE_BYTES = 200;
const GiB = 2 ** 30;
const SPAWNER_ENV = 'TERN_AGENT_COMMAND_SPAWNER';
const VARIANTS = [
  { key: 'spawner', label: 'commands through the spawner (default)', env: undefined },
  { key: 'direct', label: `direct commands (${SPAWNER_ENV}=0)`, env: '0' },
];

async function redisCli(lab, args, timeoutMs = 20_000) {
  const r = await lab.run('client', ['redis-cli', '-h', lab.info.serviceAddress, '-p', '6379', ...args], { timeoutMs });
  // redis-cli exits 0 on error replies: look at the reply itself.
  if (r.code !== 0 || /^(ERR|WRONGTYPE|NOPERM|Could not connect)/.test(r.stdout + r.stderr)) throw new Error(`redis-cli ${args.join(' ')}: exit ${r.code ?? r.signal}: ${r.stdout}${r.stderr}`);
  return r.stdout.trim();
}

/** True when `pid` is a redis-server in `host` (one read of /proc, zombies excluded). */
async function redisOn(lab, host, pid) {
  const r = await lab.run(host, ['sh', '-c', `s=$(cat /proc/${pid}/status 2>/dev/null) && printf %s "$s" | grep -q '^Name:[[:space:]]*redis-server' && ! printf %s "$s" | grep -q '^State:.*Z'`]);
  return r.code === 0;
}

async function hasServiceAddress(lab, host) {
  const r = await lab.run(host, ['ip', '-4', '-o', 'addr', 'show', 'dev', 'eth0']);
  return r.stdout.includes(` ${lab.info.serviceAddress}/32 `);
}

/** The command lines of an agent's children (the spawner, if it runs one). */
async function agentChildren(lab, host) {
  const pid = lab.agents().hosts[host].pid;
  const r = await lab.run(host, ['sh', '-c', `for c in $(cat /proc/${pid}/task/*/children 2>/dev/null); do tr '\\0' ' ' </proc/$c/cmdline; echo; done`]);
  return r.stdout.split('\n').filter((l) => l.trim() !== '');
}

async function vmHwmKiB(lab, host) {
  const pid = lab.agents().hosts[host].pid;
  const r = await lab.run(host, ['sh', '-c', `grep VmHWM /proc/${pid}/status`]);
  return Number(/(\d+)/.exec(r.stdout)?.[1]);
}

/** A lab whose agents run with or without the spawner, and an (empty) redis-server on hostA. */
async function setUp(v, labs) {
  const lab = await Lab.create({ hosts: 2, owned: true });
  const ctx = { v, lab, pid: null, on: 'hostA', dir: mkdtempSync(join(tmpdir(), `tern-bench-handoff-${v.key}-`)), downtime: [], claim: [] };
  labs.push(ctx);
  // The lab starts its agents with this process's environment: set (or clear) the switch around it.
  const saved = process.env[SPAWNER_ENV];
  if (v.env === undefined) delete process.env[SPAWNER_ENV];
  else process.env[SPAWNER_ENV] = v.env;
  try {
    await lab.startAgents();
  } finally {
    if (saved === undefined) delete process.env[SPAWNER_ENV];
    else process.env[SPAWNER_ENV] = saved;
  }
  await checkSpawners(ctx);
  const redis = await lab.startDaemon('hostA', [
    'redis-server', '--port', '6379', '--bind', '0.0.0.0', '--protected-mode', 'no', '--save', '', '--appendonly', 'no',
    '--enable-debug-command', 'yes', '--dir', ctx.dir,
  ], { logFile: join(ctx.dir, 'redis.log') });
  ctx.pid = redis.pid;
  for (let i = 0; ; i++) {
    const pong = await redisCli(lab, ['PING']).catch(() => null);
    if (pong === 'PONG') break;
    if (i > 200) throw new Error(`${v.key}: redis-server on hostA did not answer on ${lab.info.serviceAddress}`);
    await sleep(50);
  }
  return ctx;
}

/** Each agent runs a spawner child when (and only when) the variant says so. */
async function checkSpawners(ctx) {
  for (const host of ['hostA', 'hostB']) {
    for (let i = 0; ; i++) {
      const children = await agentChildren(ctx.lab, host);
      const spawners = children.filter((c) => /spawner-child/.test(c));
      if (ctx.v.env === undefined ? spawners.length === 1 : spawners.length === 0) break;
      if (i < 20) {
        await sleep(100); // (a spawner is forked as the agent starts, not before it listens)
        continue;
      }
      throw new Error(`${ctx.v.key}: the ${host} agent's children are ${JSON.stringify(children)}: expected ${ctx.v.env === undefined ? 'one' : 'no'} command spawner`);
    }
  }
}

/** The destination agent's "since the request − restore call" for migration `id` (ms). */
async function claimMs(ctx, host, id) {
  const log = ctx.lab.agents().hosts[host].log;
  const re = new RegExp(`migration ${id.replace(/[^\w-]/g, '\\$&')}: restore call ([\\d.]+) ms, engine [\\d.]+ ms .*?since the request ([\\d.]+) ms`);
  for (let i = 0; i < 20; i++) {
    const m = re.exec(readFileSync(log, 'utf8'));
    if (m) return Number(m[2]) - Number(m[1]);
    await sleep(50);
  }
  return NaN;
}

/** One verified pre-copy move of the lab's redis to `to`; resolves to its downtime and claim time. */
async function move(ctx, to, expect) {
  const { lab, pid, v } = ctx;
  const from = ctx.on;
  const r = await lab.run('client', [process.execPath, cli, '--lab', lab.name, '--from', from, '--to', to, '--pid', String(pid), '--mode', 'precopy', '--json'], { timeoutMs: 300_000 });
  let doc = null;
  try {
    doc = JSON.parse(r.stdout);
  } catch {}
  const rec = doc?.migration;
  if (r.code !== 0 || rec?.state !== 'done') throw new Error(`${v.key}: ${from} → ${to}: migrate exit ${r.code}, state ${rec?.state}: ${JSON.stringify(rec?.failure ?? null)} ${r.stderr.slice(-500)}`);
  ctx.on = to;
  if (!(await redisOn(lab, to, pid))) throw new Error(`${v.key}: ${from} → ${to}: redis pid ${pid} does not run on ${to}`);
  if (await redisOn(lab, from, pid)) throw new Error(`${v.key}: ${from} → ${to}: redis pid ${pid} still runs on ${from}`);
  if (!(await hasServiceAddress(lab, to)) || (await hasServiceAddress(lab, from))) throw new Error(`${v.key}: ${from} → ${to}: ${lab.info.serviceAddress} is not on ${to}'s eth0 alone`);
  const dbsize = await redisCli(lab, ['DBSIZE'], 60_000);
  if (expect !== undefined && dbsize !== expect) throw new Error(`${v.key}: ${from} → ${to}: DBSIZE ${dbsize}, was ${expect}`);
  return { downtimeMs: rec.stats.downtimeMs, claimMs: await claimMs(ctx, to, rec.id), rounds: rec.stats.rounds };
}

async function tearDown(ctx) {
  // Only the redis this run started, by its pid, in the host it is in now (and the other, in case a
  // move failed half-way), if it is still the redis; then the lab (its agents) and the data dir.
  for (const host of [ctx.on, ctx.on === 'hostA' ? 'hostB' : 'hostA']) {
    if (ctx.pid !== null && (await redisOn(ctx.lab, host, ctx.pid).catch(() => false))) {
      await ctx.lab.run(host, ['sh', '-c', `kill -9 ${ctx.pid} 2>/dev/null; for i in $(seq 300); do test -d /proc/${ctx.pid} || exit 0; sleep 0.05; done`]).catch(() => {});
    }
  }
  await ctx.lab.destroy().catch((err) => process.stderr.write(`[bench] handoff: destroying lab ${ctx.lab.name}: ${err.message}\n`));
  rmSync(ctx.dir, { recursive: true, force: true });
}

export async function run() {
  const labs = [];
  try {
    for (const v of VARIANTS) await setUp(v, labs);
    // Warm-up, not counted: fresh agents pay for JIT and first allocations in either role.
    for (const ctx of labs) {
      await move(ctx, 'hostB', '0');
      await move(ctx, 'hostA', '0');
    }
    const info = {};
    for (const ctx of labs) {
      const t0 = Date.now();
      await redisCli(ctx.lab, ['DEBUG', 'POPULATE', String(KEYS), 'key', String(VALUE_BYTES)], 300_000);
      const mem = await redisCli(ctx.lab, ['INFO', 'memory'], 60_000);
      ctx.used = Number(/used_memory:(\d+)/.exec(mem)?.[1]);
      ctx.rss = Number(/used_memory_rss:(\d+)/.exec(mem)?.[1]);
      ctx.dbsize = await redisCli(ctx.lab, ['DBSIZE']);
      ctx.digest = await redisCli(ctx.lab, ['DEBUG', 'DIGEST'], 300_000);
      if (!(ctx.used > 0.9 * GiB)) throw new Error(`${ctx.v.key}: redis holds ${ctx.used} bytes after DEBUG POPULATE, not ~1 GiB`);
      process.stderr.write(`[bench] handoff: ${ctx.v.key}: redis on hostA, DBSIZE ${ctx.dbsize}, used_memory ${(ctx.used / GiB).toFixed(2)} GiB, rss ${(ctx.rss / GiB).toFixed(2)} GiB (${((Date.now() - t0) / 1000).toFixed(0)} s)\n`);
    }
    let step = 0;
    for (let i = 0; i < RUNS; i++) {
      for (const to of ['hostB', 'hostA']) {
        const order = step++ % 2 === 0 ? labs : [...labs].reverse();
        for (const ctx of order) {
          const t0 = Date.now();
          const from = ctx.on;
          const m = await move(ctx, to, ctx.dbsize);
          ctx.downtime.push(m.downtimeMs);
          ctx.claim.push(m.claimMs);
          process.stderr.write(`[bench] handoff: ${ctx.v.key} #${i + 1} ${from} → ${to}: downtime ${m.downtimeMs.toFixed(0)} ms, restore request → engine call ${m.claimMs.toFixed(1)} ms, rounds ${m.rounds}, DBSIZE unchanged, answers on ${ctx.lab.info.serviceAddress} (${((Date.now() - t0) / 1000).toFixed(1)} s)\n`);
        }
      }
    }
    for (const ctx of labs) {
      const digest = await redisCli(ctx.lab, ['DEBUG', 'DIGEST'], 300_000);
      if (digest !== ctx.digest) throw new Error(`${ctx.v.key}: DEBUG DIGEST ${digest} after the moves, was ${ctx.digest}`);
      await checkSpawners(ctx);
      ctx.hwm = Math.max(await vmHwmKiB(ctx.lab, 'hostA'), await vmHwmKiB(ctx.lab, 'hostB')) * 1024;
      info[ctx.v.key] = ctx;
    }
    const [sp, dir] = [info.spawner, info.direct];
    const mem = `redis ${(sp.used / GiB).toFixed(2)} GiB used_memory (${(sp.rss / GiB).toFixed(2)} GiB rss), ${sp.dbsize} keys; agents' peak RSS ${(sp.hwm / GiB).toFixed(2)} / ${(dir.hwm / GiB).toFixed(2)} GiB`;
    const moves = `${RUNS}× hostA → hostB → hostA, precopy, interleaved with the other lab`;
    const ratios = sp.downtime.map((d, i) => dir.downtime[i] / d);
    const rows = [
      row('downtime, redis ~1 GiB precopy, commands through the spawner', 'ms', sp.downtime, `${mem}; ${moves}; DBSIZE unchanged and answering on the service address after every move, DEBUG DIGEST unchanged at the end`),
      row(`baseline: downtime, redis ~1 GiB precopy, direct commands (${SPAWNER_ENV}=0)`, 'ms', dir.downtime, `same run; ${mem}`),
      row('downtime direct ÷ spawner', 'ratio', ratios, `pairwise, same step; ratio of medians ${(median(dir.downtime) / median(sp.downtime)).toFixed(2)}`),
      row('destination: restore request → engine call (image decode + address claim), spawner', 'ms', sp.claim, 'from the destination agent\'s log ("since the request" − "restore call")'),
      row('destination: restore request → engine call, direct commands', 'ms', dir.claim, `same run; saved per move (median): ${(median(dir.claim) - median(sp.claim)).toFixed(1)} ms`),
    ];
    return { rows };
  } finally {
    for (const ctx of labs) await tearDown(ctx);
  }
}
