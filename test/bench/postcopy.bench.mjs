// Post-copy and hybrid against cold, end to end through a lab, its agents and the CLI (`migrate
// --lab NAME --mode postcopy|hybrid|cold --json`): memcheck with 256 MiB, 1 GiB and 4 GiB resident
// and a writer dirtying it at 5 MB/s (its verifier thread sweeps the whole region continuously, so
// after a post-copy switchover it faults all over the region while the rest is pulled in the
// background) moves from hostA to hostB, one migration at a time, cold / postcopy / hybrid in turn
// so that the baseline (cold) is measured in the same run on the same machine. The CLI returns
// once every page is home; every moved memcheck must then go on verifying its whole region on
// hostB with errors=0 (a page pulled wrong, or zeros where data was, shows as an error), else the
// bench fails.
//
// Figures:
//  - fault service latency (fault → UFFDIO_COPY), 1 GiB post-copy: the record's stats.homing
//    faultP50Ms / faultP99Ms per run, medians over runs; cross-checked against the hostB agent's
//    tern_agent_postcopy_fault_latency_seconds histogram (bucket deltas over those runs,
//    interpolated as histogram_quantile does);
//  - background pull throughput: the lab's, stats.homing pulledBytes ÷ homeMs (1 GiB post-copy),
//    against a plain TCP copy of 1 GiB hostA → hostB over the same lab link in the same run; and
//    the engine's alone, loopback_pull_throughput (crates/tern-core/examples/pull_bench: a stopped
//    1 GiB memcheck of this host served by a PageSourceServer, pulled by RemotePages' background
//    path, every byte checked) against a plain TCP copy of the same bytes, pairwise ratios;
//  - downtime (stats.downtimeMs) per size and mode, ÷ cold pairwise; time until every page is
//    home (stats.homing.homeMs: from the restore to the last page) and total time (stats.totalMs).
// Reference, not measured here: CRIU's lazy-pages pulled 1 GiB in ~4.7 s on this kind of machine.
// Runs: TERN_BENCH_RUNS (default 3) triples at 256 MiB and 1 GiB, TERN_BENCH_RUNS_4G (default 2) at
// 4 GiB; about 5 minutes on the 2-core machine. Everything shares those 2 cores (the process, both
// agents, the pull, the coordinator, the CLI; and other jobs if any): figures are of this machine.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Lab } from '@tern/lab';
import { row, median } from './stats.mjs';
import { agentMetrics, moveMemcheck, sleep, startHostMemcheck, status } from './lab-runs.mjs';

export const name = 'postcopy';
const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const pullBench = join(root, 'target', 'release', 'examples', 'pull_bench');
const RUNS = Number(process.env.TERN_BENCH_RUNS ?? 3);
const RUNS_4G = Number(process.env.TERN_BENCH_RUNS_4G ?? 2);
const RATE = 5; // MB/s the writer dirties, every size
const MODES = ['cold', 'postcopy', 'hybrid'];
const SIZES = [
  { mib: 256, runs: RUNS },
  { mib: 1024, runs: RUNS },
  { mib: 4096, runs: RUNS_4G },
];
const TCP_PORT = 7199;
const FAULT_METRIC = 'tern_agent_postcopy_fault_latency_seconds';
const MiB = 2 ** 20;

// ------------------------------------------------------------------------ lab: cold vs postcopy vs hybrid

/** The fault-latency histogram's cumulative buckets (le → count, summed over label sets). */
function faultBuckets(text) {
  const out = new Map();
  const re = new RegExp(`^${FAULT_METRIC}_bucket\\{([^}]*)\\}\\s+(\\S+)`, 'gm');
  for (const m of text.matchAll(re)) {
    const le = /le="([^"]+)"/.exec(m[1])?.[1];
    if (le === undefined) continue;
    const k = le === '+Inf' ? Infinity : Number(le);
    out.set(k, (out.get(k) ?? 0) + Number(m[2]));
  }
  return out;
}

/** Prometheus histogram_quantile over cumulative buckets (linear within a bucket). */
function histogramQuantile(q, buckets) {
  const b = [...buckets.entries()].sort((x, y) => x[0] - y[0]);
  const total = b.at(-1)?.[1] ?? 0;
  if (!total) return NaN;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const [le, count] of b) {
    if (count >= rank) {
      if (le === Infinity) return prevLe;
      return prevLe + ((le - prevLe) * (rank - prevCount)) / Math.max(1, count - prevCount);
    }
    prevLe = le;
    prevCount = count;
  }
  return prevLe;
}

async function migrateOnce(lab, mib, mode) {
  const { rec, resident, moved } = await moveMemcheck(lab, { mib, rate: RATE, mode });
  const s = rec.stats;
  const h = s.homing ?? null;
  if (mode !== 'cold' && (!h || (h.homeMs === null && h.remotePages > 0))) throw new Error(`${mode} ${mib} MiB: no homing figures in the record (${JSON.stringify(h)})`);
  return {
    downtimeMs: s.downtimeMs,
    totalMs: s.totalMs,
    rounds: s.rounds,
    resident,
    writeMbps: Number(moved.write_mbps),
    remotePages: h?.remotePages ?? 0,
    faults: h?.faults ?? 0,
    faultPages: h?.faultPages ?? 0,
    backgroundPages: h?.backgroundPages ?? 0,
    faultP50Ms: h?.faultP50Ms ?? NaN,
    faultP99Ms: h?.faultP99Ms ?? NaN,
    homeMs: h ? (h.homeMs ?? 0) : NaN,
    reconnects: h?.reconnects ?? 0,
    pulledBytes: h?.pulledBytes ?? 0,
    pullMiBps: h && h.homeMs > 0 ? h.pulledBytes / MiB / (h.homeMs / 1000) : NaN,
  };
}

/** Plain TCP, 1 GiB hostA → hostB over the lab link, into fresh memory (pull_bench tcp-sink/-source). */
async function labPlainTcp(lab, mib) {
  const addr = lab.host('hostB').address;
  const sink = lab.run('hostB', [pullBench, 'tcp-sink', String(TCP_PORT), String(mib)], { timeoutMs: 60_000 });
  const src = await lab.run('hostA', [pullBench, 'tcp-source', `${addr}:${TCP_PORT}`, String(mib)], { timeoutMs: 60_000 });
  const got = await sink;
  if (src.code !== 0 || got.code !== 0) throw new Error(`plain TCP hostA → hostB: source exit ${src.code} (${src.stderr.trim()}), sink exit ${got.code} (${got.stderr.trim()})`);
  return JSON.parse(got.stdout.trim());
}

async function labModes() {
  const rows = [];
  const lab = await Lab.create({ hosts: 2, owned: true });
  try {
    await lab.startAgents();
    // Warm-up, not counted: the first migration of fresh agents pays for JIT and first allocations.
    for (const mode of MODES) await migrateOnce(lab, 16, mode);
    for (const { mib, runs } of SIZES) {
      const by = Object.fromEntries(MODES.map((m) => [m, []]));
      const faultHist = new Map(); // le → faults sampled on hostB during the 1 GiB postcopy runs
      const tcp = [];
      for (let i = 0; i < runs; i++) {
        for (const mode of MODES) {
          const t0 = Date.now();
          const watch = mib === 1024 && mode === 'postcopy';
          const before = watch ? faultBuckets(await agentMetrics(lab, 'hostB')) : null;
          const r = await migrateOnce(lab, mib, mode);
          if (watch) {
            await sleep(1500); // the agent moves its last fault samples into the histogram
            const after = faultBuckets(await agentMetrics(lab, 'hostB'));
            for (const [k, v] of after) faultHist.set(k, (faultHist.get(k) ?? 0) + v - (before.get(k) ?? 0));
          }
          by[mode].push(r);
          const homing = mode === 'cold' ? '' : `, ${r.remotePages} pages remote: ${r.faults} faults p50 ${r.faultP50Ms.toFixed(2)} p99 ${r.faultP99Ms.toFixed(2)} ms, ${r.backgroundPages} background, home in ${r.homeMs.toFixed(0)} ms (${r.pullMiBps.toFixed(0)} MiB/s), reconnects ${r.reconnects}`;
          process.stderr.write(`[bench] postcopy: ${mib} MiB ${mode} #${i + 1}: downtime ${r.downtimeMs.toFixed(0)} ms, total ${r.totalMs.toFixed(0)} ms${homing}, errors=0 on hostB (${((Date.now() - t0) / 1000).toFixed(0)} s)\n`);
        }
        if (mib === 1024) {
          tcp.push(await labPlainTcp(lab, 1024));
          process.stderr.write(`[bench] postcopy: plain TCP hostA → hostB, 1 GiB: ${tcp.at(-1).mibPerSec.toFixed(0)} MiB/s\n`);
        }
      }
      const pick = (m, k) => by[m].map((r) => r[k]);
      const label = mib >= 1024 ? `${mib / 1024} GiB` : `${mib} MiB`;
      const res = `${(median(pick('postcopy', 'resident')) / MiB).toFixed(0)} MiB resident, writer ${RATE} MB/s (measured ${median(pick('postcopy', 'writeMbps')).toFixed(1)})`;
      rows.push(row(`${label}: downtime, postcopy`, 'ms', pick('postcopy', 'downtimeMs'), `${res}; errors=0 on hostB after every move`));
      rows.push(row(`${label}: downtime, hybrid`, 'ms', pick('hybrid', 'downtimeMs'), `pre-copy rounds ${median(pick('hybrid', 'rounds'))}; ${median(pick('hybrid', 'remotePages'))} pages left to pull`));
      rows.push(row(`${label}: baseline: downtime, cold`, 'ms', pick('cold', 'downtimeMs')));
      rows.push(row(`${label}: downtime postcopy ÷ cold`, 'ratio', by.postcopy.map((p, i) => p.downtimeMs / by.cold[i].downtimeMs), 'pairwise, same run'));
      rows.push(row(`${label}: downtime hybrid ÷ cold`, 'ratio', by.hybrid.map((p, i) => p.downtimeMs / by.cold[i].downtimeMs), 'pairwise, same run'));
      rows.push(row(`${label}: every page home (restore → last page), postcopy`, 'ms', pick('postcopy', 'homeMs'), `${median(pick('postcopy', 'remotePages'))} pages pulled: median ${median(pick('postcopy', 'faultPages'))} by ${median(pick('postcopy', 'faults'))} faults, ${median(pick('postcopy', 'backgroundPages'))} background; reconnects ${Math.max(...pick('postcopy', 'reconnects'))}`));
      rows.push(row(`${label}: every page home (restore → last page), hybrid`, 'ms', pick('hybrid', 'homeMs'), `${median(pick('hybrid', 'remotePages'))} pages pulled from hostA, the pre-copied rest filled lazily from hostB's own page store: median ${median(pick('hybrid', 'faultPages'))} pages by fault, ${median(pick('hybrid', 'backgroundPages'))} background`));
      for (const m of MODES) rows.push(row(`${label}: total time (start → done), ${m}`, 'ms', pick(m, 'totalMs'), m === 'cold' ? 'cold: every page is home at the restore' : undefined));
      rows.push(row(`${label}: fault service latency p50 (per run), postcopy`, 'ms', pick('postcopy', 'faultP50Ms'), 'stats.homing, fault → UFFDIO_COPY; median over runs'));
      rows.push(row(`${label}: fault service latency p99 (per run), postcopy`, 'ms', pick('postcopy', 'faultP99Ms'), 'stats.homing; median over runs'));
      if (mib === 1024) {
        const sampled = faultHist.get(Infinity) ?? 0;
        const hq = (q) => histogramQuantile(q, faultHist) * 1000;
        rows.push({ metric: '1 GiB: fault latency p50 / p99, hostB agent histogram (all runs)', unit: 'ms', median: hq(0.5), p99: hq(0.99), n: sampled, note: `${FAULT_METRIC}: bucket deltas over the postcopy runs, histogram_quantile; n = sampled faults` });
        const pull = pick('postcopy', 'pullMiBps');
        rows.push(row('1 GiB: background pull throughput in the lab, postcopy (pulledBytes ÷ homeMs)', 'MiB/s', pull, `median ${(median(pick('postcopy', 'pulledBytes')) / MiB).toFixed(0)} MiB pulled while the process runs and faults; CRIU lazy-pages (reference, not measured): 1 GiB in ~4.7 s ≈ 218 MiB/s`));
        rows.push(row('1 GiB: baseline: plain TCP hostA → hostB, same lab link, into fresh memory', 'MiB/s', tcp.map((t) => t.mibPerSec), 'pull_bench tcp-sink/tcp-source, 4 MiB writes'));
        rows.push(row('1 GiB: lab pull ÷ plain TCP on the same link', 'ratio', pull.map((p, i) => p / tcp[i].mibPerSec), 'pairwise, same run'));
      }
    }
  } finally {
    await lab.destroy();
  }
  return rows;
}

// ------------------------------------------------------------------------ engine: loopback pull vs plain TCP

async function loopbackPull() {
  const MIB = 1024;
  const dir = mkdtempSync(join(tmpdir(), 'tern-bench-pull-'));
  const file = join(dir, 'memcheck.status');
  const { pid, region } = await startHostMemcheck(MIB, RATE, file);
  try {
    // Stopped for the whole measurement: its pages are read once directly and must equal the pulled.
    process.kill(pid, 'SIGSTOP');
    for (let i = 0; ; i++) {
      const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
      if (st.slice(st.lastIndexOf(')') + 2)[0] === 'T') break;
      if (i > 100) throw new Error(`memcheck ${pid} did not stop: ${st}`);
      await sleep(20);
    }
    const r = spawnSync(pullBench, [String(pid), region, String(MIB), String(RUNS)], { cwd: root, encoding: 'utf8', timeout: 300_000 });
    if (r.status !== 0) throw new Error(`pull_bench failed (${r.status ?? r.signal}): ${r.stderr}`);
    const reports = r.stdout.trim().split('\n').map((l) => JSON.parse(l));
    for (const rep of reports) {
      if (rep.bytes !== MIB * MiB || rep.remote?.prefetchPages !== MIB * 256) throw new Error(`pull_bench: unexpected report ${JSON.stringify(rep)}`);
    }
    process.kill(pid, 'SIGCONT');
    await sleep(500);
    const st = status(file);
    if (st.errors !== '0') throw new Error(`memcheck served by the pull reports errors=${st.errors} (${st.lasterror})`);
    return [
      row('engine: background pull, 1 GiB loopback (loopback_pull_throughput)', 'MiB/s', reports.map((x) => x.pullMibPerSec), `stopped 1 GiB memcheck, PageSourceServer → RemotePages, 1 MiB requests, 16 MiB in flight; every byte checked`),
      row('engine: baseline: plain TCP, same bytes, same link, into the same buffer', 'MiB/s', reports.map((x) => x.plainTcpMibPerSec)),
      row('engine: pull ÷ plain TCP', 'ratio', reports.map((x) => x.pullMibPerSec / x.plainTcpMibPerSec), 'pairwise, same run'),
    ];
  } finally {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {}
    for (let i = 0; i < 100 && existsSync(`/proc/${pid}`); i++) await sleep(50);
    rmSync(dir, { recursive: true, force: true });
  }
}

function buildPullBench() {
  const b = spawnSync('cargo', ['build', '--quiet', '--release', '-p', 'tern-core', '--example', 'pull_bench'], { cwd: root, encoding: 'utf8' });
  if (b.status !== 0) throw new Error(`building pull_bench failed: ${b.stderr}`);
}

export async function run() {
  buildPullBench();
  const rows = await labModes();
  rows.push(...(await loopbackPull()));
  return { rows };
}
