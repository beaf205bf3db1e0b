/**
 * Shared plumbing for end-to-end tests: a lab per test file (always destroyed), the CLI as a child
 * process, and small waits. Tests start every process they touch themselves.
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Lab } from '@tern/lab';
import type { MigrationEvent } from '@tern/protocol';

export const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const cliMain = join(repoRoot, 'apps', 'cli', 'dist', 'main.js');

interface Teardownable {
  teardown(fn: () => unknown): void;
}

/** A fresh lab for one test, destroyed in teardown whatever happens. */
export async function labFor(t: Teardownable, hosts = 2): Promise<Lab> {
  const lab = await Lab.create({ hosts });
  t.teardown(() => lab.destroy());
  return lab;
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `migrate ARGS` (the built CLI) on this machine, in the root namespaces. */
export function runCli(args: string[], opts: { env?: NodeJS.ProcessEnv; asUid?: number } = {}): Promise<CliResult> {
  // As another user, tap's coverage and process-info hooks (which it injects into every child's
  // environment, writing into a root-owned .tap/) would fail before our code runs: `env -i` gives
  // that process a plain environment and setpriv drops to the user.
  const [cmd, argv] =
    opts.asUid === undefined
      ? [process.execPath, [cliMain, ...args]]
      : ['env', ['-i', `PATH=${process.env.PATH ?? '/usr/bin:/bin'}`, 'setpriv', `--reuid=${opts.asUid}`, `--regid=${opts.asUid}`, '--clear-groups', process.execPath, cliMain, ...args]];
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, argv, { env: { ...process.env, ...opts.env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** Runs `migrate ARGS` inside a lab host's namespaces (pids as that host sees them). */
export async function runCliInHost(lab: Lab, host: string, args: string[]): Promise<CliResult> {
  const r = await lab.run(host, [process.execPath, cliMain, ...args], { timeoutMs: 60_000 });
  return { code: r.code, stdout: r.stdout, stderr: r.stderr };
}

export async function sleep(ms: number): Promise<void> {
  await new Promise((r) => setTimeout(r, ms));
}

/** Polls `probe` until it returns a truthy value or `timeoutMs` passes. */
export async function waitFor<T>(what: string, probe: () => Promise<T> | T, timeoutMs = 10_000, everyMs = 50): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await probe();
      if (v) return v as NonNullable<T>;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${String(last)}` : ''}`);
    }
    await sleep(everyMs);
  }
}

/** Counts of what /proc says about a process, to compare against the engine's inventory. */
export function procCounts(rootPid: number): { threads: number; fds: number; vmas: number } {
  const ls = (dir: string) => spawnSync('ls', [dir], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean).length;
  return {
    threads: ls(`/proc/${rootPid}/task`),
    fds: ls(`/proc/${rootPid}/fd`),
    vmas: readFileSync(`/proc/${rootPid}/maps`, 'utf8').split('\n').filter(Boolean).length,
  };
}

/** Signal-related fields of /proc/PID/status: pending, blocked, caught. */
export function signalState(rootPid: number): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of readFileSync(`/proc/${rootPid}/status`, 'utf8').split('\n')) {
    const m = /^(SigPnd|ShdPnd|SigBlk|SigIgn|SigCgt):\s+(\S+)/.exec(line);
    if (m?.[1] && m[2]) out[m[1]] = m[2];
  }
  return out;
}

/** Redis helper: `redis-cli` against a server, run from the lab's client namespace. */
export async function redisCli(lab: Lab, host: string, address: string, port: number, args: string[], timeoutMs = 20_000): Promise<string> {
  const r = await lab.run(host, ['redis-cli', '-h', address, '-p', String(port), ...args], { timeoutMs });
  // redis-cli exits 0 on error replies: look at the reply itself.
  if (r.code !== 0 || /^(ERR|WRONGTYPE|NOPERM)/.test(r.stdout)) throw new Error(`redis-cli ${args.join(' ')} failed: ${r.stdout}${r.stderr}`);
  return r.stdout.trim();
}

// ---------------------------------------------------------------- migrations through the CLI

export interface MigrateJson {
  id: string;
  state: string;
  failure?: { kind: string; phase?: string; message: string } | null;
  [k: string]: unknown;
}

export async function migrate(
  lab: Lab,
  pid: number,
  from = 'hostA',
  to = 'hostB',
  extra: string[] = [],
): Promise<{ code: number | null; record: MigrateJson | null; events: MigrationEvent[]; out: string }> {
  const r = await lab.run('client', [process.execPath, cliMain, '--lab', lab.name, '--from', from, '--to', to, '--pid', String(pid), '--json', ...extra], { timeoutMs: 300_000 });
  const out = r.stdout + r.stderr;
  let record: MigrateJson | null = null;
  let events: MigrationEvent[] = [];
  try {
    // --json prints one document: { migration, events }.
    const doc = JSON.parse(r.stdout) as { migration: MigrateJson; events?: MigrationEvent[] };
    record = doc.migration;
    events = doc.events ?? [];
  } catch {
    record = null;
  }
  return { code: r.code, record, events, out };
}

/** True when `pid` runs in `host`'s pid namespace (as that host sees it). */
export async function runsOn(lab: Lab, host: string, pid: number): Promise<boolean> {
  // One read of the status: between a `test -d` and a grep the zombie may be reaped (grep then
  // fails and a process that is gone would count as running).
  const r = await lab.run(host, ['sh', '-c', `s=$(cat /proc/${pid}/status 2>/dev/null) && ! printf %s "$s" | grep -q '^State:.*Z'`]);
  return r.code === 0;
}

export async function labWithAgents(t: Teardownable): Promise<Lab> {
  const lab = await labFor(t, 2);
  await lab.startAgents();
  return lab;
}

/**
 * redis-server (Debian's) as a daemon in a lab host, serving on every address, no persistence,
 * DEBUG allowed; resolves with its pid (as the host sees it) once it answers PING at `address`
 * (default: the lab's service address) from the client namespace.
 */
export async function startRedis(lab: Lab, host = 'hostA', opts: { address?: string; extra?: string[] } = {}): Promise<number> {
  const dir = mkdtempSync(join(tmpdir(), 'tern-redis-'));
  const redis = await lab.startDaemon(host, [
    'redis-server', '--port', '6379', '--bind', '0.0.0.0', '--protected-mode', 'no', '--save', '', '--appendonly', 'no',
    '--enable-debug-command', 'yes', '--dir', dir, ...(opts.extra ?? []),
  ], { logFile: join(dir, 'redis.log') });
  const address = opts.address ?? lab.info.serviceAddress;
  await waitFor(`redis-server on ${host}`, async () => {
    try {
      return (await redisCli(lab, 'client', address, 6379, ['PING'])) === 'PONG' ? true : null;
    } catch {
      return null; // not up yet
    }
  }, 10_000);
  return redis.pid;
}
