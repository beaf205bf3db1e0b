// Freeze + thaw latency of a 5-thread redis-server (Debian package) in a lab host, 200 tries, and
// the round trip of one remote syscall (getpid) into it. The baseline in the same run is the
// kernel's own job-control stop: SIGSTOP/SIGCONT of the same server, timed until every thread is
// seen stopped (resp. running) in /proc — the cheapest way any tool can stop a process.
import { readFileSync, readdirSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Lab } from '@tern/lab';
import { Tracer } from '@tern/native';
import { row } from './stats.mjs';

export const name = 'freeze';
const TRIES = 200;
const SYSCALLS = 2000;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const ms = (ns) => Number(ns) / 1e6;

function allThreads(rootPid, pred) {
  return readdirSync(`/proc/${rootPid}/task`).every((tid) => {
    const stat = readFileSync(`/proc/${rootPid}/task/${tid}/stat`, 'utf8');
    return pred(stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3));
  });
}

export async function run() {
  const lab = await Lab.create({ hosts: 1 });
  try {
    const dir = mkdtempSync(join(tmpdir(), 'tern-bench-'));
    const redis = await lab.startDaemon('hostA', ['redis-server', '--port', '6379', '--save', '', '--appendonly', 'no', '--dir', dir]);
    for (let i = 0; !readdirSync(`/proc/${redis.rootPid}/task`).length || readdirSync(`/proc/${redis.rootPid}/task`).length < 5; i++) {
      if (i > 200) throw new Error('redis did not start its 5 threads');
      await sleep(20);
    }
    const threads = readdirSync(`/proc/${redis.rootPid}/task`).length;

    // Baseline: SIGSTOP until all threads are 'T', SIGCONT until none is.
    const sigstop = [];
    const sigcont = [];
    for (let i = 0; i < TRIES; i++) {
      let t0 = process.hrtime.bigint();
      process.kill(redis.rootPid, 'SIGSTOP');
      while (!allThreads(redis.rootPid, (s) => s === 'T'));
      sigstop.push(ms(process.hrtime.bigint() - t0));
      t0 = process.hrtime.bigint();
      process.kill(redis.rootPid, 'SIGCONT');
      while (!allThreads(redis.rootPid, (s) => s !== 'T'));
      sigcont.push(ms(process.hrtime.bigint() - t0));
      await sleep(2);
    }

    const tracer = Tracer.open(redis.rootPid);
    const freezeEngine = [];
    const thawEngine = [];
    const cycleWall = [];
    const syscallWall = [];
    try {
      for (let i = 0; i < TRIES; i++) {
        const t0 = process.hrtime.bigint();
        const f = await tracer.freeze();
        const th = await tracer.thaw();
        cycleWall.push(ms(process.hrtime.bigint() - t0));
        freezeEngine.push(f.elapsedNs / 1e6);
        thawEngine.push(th.elapsedNs / 1e6);
        await sleep(2);
      }
      await tracer.freeze();
      for (let i = 0; i < SYSCALLS; i++) {
        const t0 = process.hrtime.bigint();
        const pid = await tracer.syscall(39);
        syscallWall.push(ms(process.hrtime.bigint() - t0) * 1000);
        if (pid !== redis.pid) throw new Error(`remote getpid returned ${pid}, expected ${redis.pid}`);
      }
      await tracer.thaw();
    } finally {
      await tracer.close();
    }
    return {
      threads,
      rows: [
        row('freeze (seize + interrupt all threads), engine-timed', 'ms', freezeEngine, `${threads} threads`),
        row('thaw (restore regs + detach), engine-timed', 'ms', thawEngine),
        row('freeze + thaw cycle, from JS', 'ms', cycleWall),
        row('baseline: SIGSTOP until all threads stopped', 'ms', sigstop, 'kernel job control, polled via /proc'),
        row('baseline: SIGCONT until all threads running', 'ms', sigcont),
        row('remote syscall getpid round trip, from JS', 'µs', syscallWall, 'incl. Neon task + tracer thread hop'),
      ],
    };
  } finally {
    await lab.destroy();
  }
}
