// Cold migration through the engine on this host: a memcheck workload with 256 MiB and 1 GiB
// resident is frozen, dumped and streamed over the TERN page stream (loopback), killed, and
// restored with the same pid; figures: frozen time (freeze → restored process running), dump,
// restore, dump throughput. Baseline in the same run: the page stream against a plain TCP copy of
// the same number of bytes over the same link (crates/tern-core/examples/page_bench).
// Reference from DESIGN/issue: CRIU 4.2 froze a 1 GiB process ~2.9 s and restored it ~1.0 s here.
import { spawnSync } from 'node:child_process';
import { readFileSync, rmSync, existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { PageServer, SourceSession, newPageCredentials, restoreProcess } from '@tern/native';
import { row } from './stats.mjs';

export const name = 'cold';
const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const memcheck = join(root, 'test', 'workloads', 'bin', 'memcheck');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const RUNS = Number(process.env.TERN_BENCH_RUNS ?? 3);

function status(file) {
  return Object.fromEntries(readFileSync(file, 'utf8').trim().split(/\s+/).map((kv) => kv.split('=')));
}

/** Starts memcheck under a shell that reaps it at once (so its pid is free again right after the kill). */
async function startWorkload(mib, file) {
  rmSync(file, { force: true });
  spawnSync('setsid', ['-f', 'sh', '-c', `${memcheck} --status ${file} --mib ${mib} --threads read,sleep >/dev/null 2>&1; true`], { stdio: 'ignore' });
  for (let i = 0; i < 600; i++) {
    if (existsSync(file) && Number(status(file).sweeps ?? 0) >= 1) return Number(status(file).pid);
    await sleep(50);
  }
  throw new Error(`memcheck ${mib} MiB did not finish its first sweep`);
}

async function migrateOnce(mib) {
  const file = `/tmp/tern-bench-cold-${mib}.status`;
  const pid = await startWorkload(mib, file);
  const creds = newPageCredentials();
  const server = await PageServer.start({ address: '127.0.0.1', ...creds });
  const session = SourceSession.open(pid);
  try {
    const t0 = process.hrtime.bigint();
    await session.freeze();
    const { image, dump, transfer } = await session.dump({ address: '127.0.0.1', port: server.port, ...creds });
    const tDumped = process.hrtime.bigint();
    await session.commit();
    while (existsSync(`/proc/${pid}`)) await sleep(0);
    const tFree = process.hrtime.bigint();
    const restored = await restoreProcess(image, server);
    const t1 = process.hrtime.bigint();
    if (restored.pid !== pid) throw new Error(`restored as ${restored.pid}, expected ${pid}`);
    await sleep(1500);
    const after = status(file);
    process.kill(pid, 'SIGKILL');
    if (after.errors !== '0') throw new Error(`memcheck reports errors after restore: ${after.lasterror}`);
    return {
      frozenMs: Number(t1 - t0) / 1e6,
      dumpMs: Number(tDumped - t0) / 1e6,
      pidFreeMs: Number(tFree - tDumped) / 1e6,
      restoreMs: restored.timings.totalNs / 1e6,
      dumpMBps: dump.bytes / 1e6 / (dump.elapsedNs / 1e9),
      streamMBps: transfer.payloadBytes / 1e6 / transfer.elapsedSecs,
      bytes: dump.bytes,
    };
  } finally {
    await session.abort().catch(() => {});
    await server.close();
  }
}

export async function run() {
  const rows = [];
  for (const mib of [256, 1024]) {
    const runs = [];
    for (let i = 0; i < RUNS; i++) runs.push(await migrateOnce(mib));
    const pick = (k) => runs.map((r) => r[k]);
    const note = `${mib} MiB region, ${(runs[0].bytes / 2 ** 20).toFixed(0)} MiB of pages moved`;
    rows.push(row(`cold ${mib} MiB: frozen (freeze → restored running)`, 'ms', pick('frozenMs'), note));
    rows.push(row(`cold ${mib} MiB: freeze + dump + stream`, 'ms', pick('dumpMs')));
    rows.push(row(`cold ${mib} MiB: restore`, 'ms', pick('restoreMs')));
    rows.push(row(`cold ${mib} MiB: kill and pid free again (same-host only)`, 'ms', pick('pidFreeMs')));
    rows.push(row(`cold ${mib} MiB: dump throughput`, 'MB/s', pick('dumpMBps')));
  }
  // Baseline: the same link, page stream vs plain TCP, 1 GiB, in this run.
  const bench = spawnSync('cargo', ['run', '--quiet', '--release', '-p', 'tern-core', '--example', 'page_bench', '1024', String(RUNS)], { cwd: root, encoding: 'utf8' });
  if (bench.status !== 0) throw new Error(`page_bench failed: ${bench.stderr}`);
  const reports = bench.stdout.trim().split('\n').map((l) => JSON.parse(l));
  rows.push(row('page stream into the page store, 1 GiB loopback', 'MB/s', reports.map((r) => r.pageStreamMbPerSec)));
  rows.push(row('baseline: plain TCP into fresh memory, same bytes, same link', 'MB/s', reports.map((r) => r.plainTcpFreshMemoryMbPerSec)));
  rows.push(row('page stream, reader keeps nothing', 'MB/s', reports.map((r) => r.pageStreamDiscardMbPerSec)));
  rows.push(row('baseline: plain TCP, reader discards', 'MB/s', reports.map((r) => r.plainTcpMbPerSec)));
  return { rows };
}
