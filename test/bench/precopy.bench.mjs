// Pre-copy against cold, end to end through a lab, its agents and the CLI (`migrate --lab NAME
// --mode precopy|cold --json`): memcheck with 256 MiB, 1 GiB and 4 GiB resident and a writer
// dirtying it at a fixed 20 MB/s moves from hostA to hostB, one migration at a time, cold and
// precopy alternating so that the baseline (cold) is measured in the same run on the same machine.
// Every moved memcheck must go on verifying its whole region on hostB with errors=0 (a stale page
// a round forgot to resend shows as `stale-page`), else the bench fails. Figures per size: the
// record's downtime (stats.downtimeMs), the source's frozen time (the switchover event "sent X
// bytes in Y ms frozen"), the destination's restore (engine time, from the hostB agent's
// restore_seconds metric), rounds, total time, bytes sent ÷ resident bytes, and precopy/cold.
//
// Dirty-scan cost (scanMs does not reach the coordinator's events): PrecopySession from
// @tern/native directly on a 1 GiB memcheck of this host (started under its own `setsid sh`, not a
// child of this process), page server on loopback; each round's scanNs (PAGEMAP_SCAN + re-protect
// of the dirty set) per GiB, for an (almost) clean region and for two known dirty rates with a
// fixed pause between rounds (the round's dirtyPages is the count found). Baseline in the same run:
// the bare ioctl in /work/shared/probes/pm_scan.c (its own process, 1 GiB, clean and ~3.7k dirty).
// Runs: TERN_BENCH_RUNS (default 3) pairs at 256 MiB and 1 GiB, TERN_BENCH_RUNS_4G (default 2) at
// 4 GiB; about 5 minutes on the 2-core machine, most of it the 4 GiB pairs.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Lab } from '@tern/lab';
import { PageServer, PrecopySession, newPageCredentials } from '@tern/native';
import { row, median } from './stats.mjs';
import { agentMetrics, moveMemcheck, sleep, startHostMemcheck, status } from './lab-runs.mjs';

export const name = 'precopy';
const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const pmScanSrc = '/work/shared/probes/pm_scan.c';
const RUNS = Number(process.env.TERN_BENCH_RUNS ?? 3);
const RUNS_4G = Number(process.env.TERN_BENCH_RUNS_4G ?? 2);
const RATE = 20; // MB/s the writer dirties, every size
const SIZES = [
  { mib: 256, runs: RUNS },
  { mib: 1024, runs: RUNS },
  { mib: 4096, runs: RUNS_4G },
];
const GiB = 2 ** 30;

// ------------------------------------------------------------------------ lab: cold vs precopy

async function restoreSecondsSum(lab) {
  const m = /^\S*restore_seconds_sum(?:\{[^}]*\})?\s+(\S+)/m.exec(await agentMetrics(lab, 'hostB'));
  return m ? Number(m[1]) : NaN;
}

const at = (events, pred) => {
  const e = events.find(pred);
  return e ? Date.parse(e.at) : NaN;
};

async function migrateOnce(lab, mib, mode) {
  let restoreBefore = NaN;
  let restoreAfter = NaN;
  const { rec, events, resident, moved } = await moveMemcheck(lab, {
    mib,
    rate: RATE,
    mode,
    measure: async (phase) => {
      if (phase === 'before') restoreBefore = await restoreSecondsSum(lab);
      else restoreAfter = await restoreSecondsSum(lab);
    },
  });
  const frozen = /sent (\d+) bytes in ([\d.]+) ms frozen/.exec(events.find((e) => /ms frozen/.test(e.message))?.message ?? '');
  const tPrecopy = at(events, (e) => e.type === 'phase' && e.state === 'precopy');
  const tSwitch = at(events, (e) => e.type === 'phase' && e.state === 'switchover');
  const tRestore = at(events, (e) => e.type === 'phase' && e.state === 'restoring');
  const tCommit = at(events, (e) => /commit point passed/.test(e.message));
  const s = rec.stats;
  return {
    downtimeMs: s.downtimeMs,
    frozenMs: frozen ? Number(frozen[2]) : NaN,
    frozenBytes: frozen ? Number(frozen[1]) : NaN,
    restoreEngineMs: (restoreAfter - restoreBefore) * 1000,
    restoreLegMs: tCommit - tRestore,
    precopyMs: tSwitch - tPrecopy,
    totalMs: s.totalMs,
    rounds: s.rounds,
    bytes: s.bytes,
    resident,
    bytesPerResident: s.bytes / resident,
    writeMbps: Number(moved.write_mbps),
  };
}

async function coldVsPrecopy() {
  const rows = [];
  const lab = await Lab.create({ hosts: 2, owned: true });
  try {
    await lab.startAgents();
    // Warm-up, not counted: the first migration of fresh agents pays for JIT and first allocations.
    await migrateOnce(lab, 16, 'cold');
    await migrateOnce(lab, 16, 'precopy');
    for (const { mib, runs } of SIZES) {
      const cold = [];
      const pre = [];
      for (let i = 0; i < runs; i++) {
        for (const mode of ['cold', 'precopy']) {
          const t0 = Date.now();
          const r = await migrateOnce(lab, mib, mode);
          (mode === 'cold' ? cold : pre).push(r);
          process.stderr.write(`[bench] precopy: ${mib} MiB ${mode} #${i + 1}: downtime ${r.downtimeMs.toFixed(0)} ms (frozen ${r.frozenMs.toFixed(0)}, restore ${r.restoreEngineMs.toFixed(0)}), rounds ${r.rounds}, total ${r.totalMs.toFixed(0)} ms, ${(r.bytesPerResident).toFixed(2)}× resident, errors=0 on hostB (${((Date.now() - t0) / 1000).toFixed(0)} s)\n`);
        }
      }
      const pick = (rs, k) => rs.map((r) => r[k]);
      const label = mib >= 1024 ? `${mib / 1024} GiB` : `${mib} MiB`;
      const res = `${(median(pick(pre, 'resident')) / 2 ** 20).toFixed(0)} MiB resident, writer ${RATE} MB/s (measured ${median(pick(pre, 'writeMbps')).toFixed(1)})`;
      rows.push(row(`${label}: downtime, precopy`, 'ms', pick(pre, 'downtimeMs'), `${res}; errors=0 on hostB after every move`));
      rows.push(row(`${label}: baseline: downtime, cold`, 'ms', pick(cold, 'downtimeMs')));
      rows.push(row(`${label}: downtime precopy ÷ cold`, 'ratio', pre.map((p, i) => p.downtimeMs / cold[i].downtimeMs), 'pairwise, same run'));
      rows.push(row(`${label}: source frozen (freeze+final dump), precopy`, 'ms', pick(pre, 'frozenMs'), `${(median(pick(pre, 'frozenBytes')) / 2 ** 20).toFixed(1)} MiB in the freeze`));
      rows.push(row(`${label}: source frozen, cold`, 'ms', pick(cold, 'frozenMs'), `${(median(pick(cold, 'frozenBytes')) / 2 ** 20).toFixed(0)} MiB in the freeze`));
      rows.push(row(`${label}: restore on hostB (engine), precopy`, 'ms', pick(pre, 'restoreEngineMs'), `restore leg seen by the coordinator: ${median(pick(pre, 'restoreLegMs')).toFixed(0)} ms`));
      rows.push(row(`${label}: restore on hostB (engine), cold`, 'ms', pick(cold, 'restoreEngineMs'), `restore leg: ${median(pick(cold, 'restoreLegMs')).toFixed(0)} ms`));
      rows.push(row(`${label}: rounds, precopy`, 'rounds', pick(pre, 'rounds'), `pre-copy phase ${median(pick(pre, 'precopyMs')).toFixed(0)} ms`));
      rows.push(row(`${label}: total time, precopy`, 'ms', pick(pre, 'totalMs')));
      rows.push(row(`${label}: total time, cold`, 'ms', pick(cold, 'totalMs')));
      rows.push(row(`${label}: bytes sent ÷ resident, precopy`, 'ratio', pick(pre, 'bytesPerResident'), `cold: ${median(pick(cold, 'bytesPerResident')).toFixed(3)}`));
    }
  } finally {
    await lab.destroy();
  }
  return rows;
}

// ------------------------------------------------------------------------ dirty-scan cost

/**
 * One tracked 1 GiB memcheck dirtying at `rate`: round 0 (the full pass), one catch-up round, then
 * `rounds` rounds each `pauseMs` after the last. Returns the measured rounds' scan ns and dirty pages.
 */
async function scanSeries(mib, rate, pauseMs, rounds) {
  const dir = mkdtempSync(join(tmpdir(), 'tern-bench-scan-'));
  const file = join(dir, 'memcheck.status');
  const { pid } = await startHostMemcheck(mib, rate, file);
  const creds = newPageCredentials();
  const server = await PageServer.start({ address: '127.0.0.1', ...creds });
  const dest = { address: '127.0.0.1', port: server.port, ...creds };
  let session = null;
  try {
    session = await PrecopySession.open(pid);
    if (session.setup.tracking !== 'uffd-wp') throw new Error(`dirty tracking is ${session.setup.tracking}, not uffd-wp (PAGEMAP_SCAN)`);
    await session.round(dest); // round 0: everything
    await session.round(dest); // what round 0's duration dirtied
    const out = [];
    for (let i = 0; i < rounds; i++) {
      await sleep(pauseMs);
      const r = await session.round(dest);
      out.push({ scanNs: r.scanNs, dirtyPages: r.dirtyPages });
    }
    const st = status(file);
    if (st.errors !== '0') throw new Error(`memcheck under tracking reports errors=${st.errors} (${st.lasterror})`);
    return out;
  } finally {
    await session?.abort().catch(() => {});
    try {
      process.kill(pid, 'SIGKILL');
    } catch {}
    await server.close();
    for (let i = 0; i < 100 && existsSync(`/proc/${pid}`); i++) await sleep(50);
    rmSync(dir, { recursive: true, force: true });
  }
}

function pmScanBaseline(runs) {
  if (!existsSync(pmScanSrc)) return null;
  const dir = mkdtempSync(join(tmpdir(), 'tern-bench-pmscan-'));
  try {
    const bin = join(dir, 'pm_scan');
    const cc = spawnSync('gcc', ['-O2', '-o', bin, pmScanSrc], { encoding: 'utf8' });
    if (cc.status !== 0) return null;
    const clean = [];
    const dirty = [];
    let dirtyPages = 0;
    for (let i = 0; i < runs; i++) {
      const r = spawnSync(bin, ['1024'], { encoding: 'utf8', timeout: 120_000 });
      const c = /clean scan \(WP_MATCHING\|CHECK_WPASYNC\): \d+ dirty pages, ([\d.]+) ms/.exec(r.stdout);
      const d = /scan\+reprotect: (\d+) pages in \d+ regions \(\d+ ioctl\), ([\d.]+) ms/.exec(r.stdout);
      if (!c || !d) throw new Error(`pm_scan output not understood: ${r.stdout.slice(-800)}${r.stderr}`);
      clean.push(Number(c[1]));
      dirty.push(Number(d[2]));
      dirtyPages = Number(d[1]);
    }
    return { clean, dirty, dirtyPages };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function scanCost() {
  const MIB = 1024;
  const perGiB = (ns) => ns / 1e6 / (MIB / 1024);
  const rows = [];
  const series = [
    { rate: 0.001, pauseMs: 200, label: 'clean region' },
    { rate: 20, pauseMs: 1000, label: '20 MB/s writer, 1 s between rounds' },
    { rate: 200, pauseMs: 1000, label: '200 MB/s writer, 1 s between rounds' },
  ];
  for (const s of series) {
    const out = await scanSeries(MIB, s.rate, s.pauseMs, 8);
    const pages = median(out.map((r) => r.dirtyPages));
    rows.push(row(`dirty scan (PAGEMAP_SCAN + re-protect), engine, ${s.label}`, 'ms/GiB', out.map((r) => perGiB(r.scanNs)), `1 GiB memcheck; median ${pages} dirty pages found per scan (${((pages * 4096) / 2 ** 20).toFixed(1)} MiB)`));
  }
  const base = pmScanBaseline(RUNS);
  if (base) {
    rows.push(row('baseline: bare PAGEMAP_SCAN ioctl (pm_scan.c), clean 1 GiB', 'ms/GiB', base.clean, 'own process, WP_MATCHING|CHECK_WPASYNC'));
    rows.push(row('baseline: bare PAGEMAP_SCAN ioctl (pm_scan.c), 1 GiB with known dirty set', 'ms/GiB', base.dirty, `${base.dirtyPages} dirty pages (every 97th + a run of 1000)`));
  } else {
    rows.push({ metric: 'baseline: bare PAGEMAP_SCAN ioctl (pm_scan.c)', unit: 'ms/GiB', median: NaN, p99: NaN, n: 0, note: `${pmScanSrc} missing or gcc failed` });
  }
  return rows;
}

export async function run() {
  const rows = await coldVsPrecopy();
  rows.push(...(await scanCost()));
  return { rows };
}
