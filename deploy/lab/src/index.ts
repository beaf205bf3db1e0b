// @tern/lab — N "hosts" on one machine out of Linux namespaces.
//
// Layout of lab <name> (every kernel object is prefixed tern-<name>-):
//   tern-<name>-sw      switch netns with bridge br0; one veth end per host/client (v-hostA, v-client…)
//   tern-<name>-hostX   host netns, eth0 = 10.77.0.(11+i)/24; plus own pid/mount/uts namespaces whose
//                       pid 1 is deploy/lab/init.c (hostname hostX)
//   tern-<name>-client  client netns, eth0 = 10.77.0.100/24
//   10.77.0.200/32      service address, on the owning host's eth0 (initially hostA)
// State: /run/tern-lab/<name>.json. See README.md.
import { spawn as cpSpawn, execFile, type ChildProcess, type SpawnOptions } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes, randomInt } from 'node:crypto';
import {
  CLIENT_ADDRESS,
  MAX_HOSTS,
  PID_RANGE,
  PKG_ROOT,
  SERVICE_ADDRESS,
  SUBNET,
  agentsDir,
  createStateExclusive,
  ensureInitBinary,
  findNsInit,
  findRootPid,
  hostAddress,
  hostLetter,
  listStateNames,
  nsLink,
  nsPids,
  netnsName,
  orphanNetnsLabNames,
  pidAlive,
  procStartTime,
  publicInfo,
  readState,
  staleLabNames,
  teardownSync,
  validateName,
  which,
  writeState,
  type LabAgents,
  type LabHostInfo,
  type LabInfo,
  type LabState,
} from './core.js';

export type { LabAgents, LabHostInfo, LabInfo } from './core.js';
export { coordinatorDbPath } from './core.js';

/** Port every lab agent listens on, on its host's address. */
export const AGENT_PORT = 7070;
export { SUBNET, SERVICE_ADDRESS, CLIENT_ADDRESS, MAX_HOSTS, PID_RANGE } from './core.js';

export type HostName = `host${string}`;

export interface ExecResult {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
}

export interface CreateOptions {
  /** [a-z0-9-]{1,12}; default 't' + 6 random base36 chars. */
  name?: string;
  /** 1..8, default 2. */
  hosts?: number;
  /** Default true: this process owns the lab (exit/signal hooks + watchdog tear it down when it dies). */
  owned?: boolean;
  /** Test-only: throw after this many setup steps (1 = switch, 2 = client, 3.. = hosts, then inits). */
  failAfterSteps?: number;
}

// ---------------------------------------------------------------- small async helpers

function execP(cmd: string, args: string[]): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { encoding: 'utf8', maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`lab: ${cmd} ${args.join(' ')} failed: ${stderr.trim() || err.message}`));
      else resolve({ stdout, stderr });
    });
  });
}
const ip = (...args: string[]) => execP('ip', args);
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function randomName(): string {
  let s = 't';
  for (let i = 0; i < 6; i++) s += randomInt(36).toString(36);
  return s;
}

// ---------------------------------------------------------------- ownership hooks

const ownedLabs = new Set<string>();
let hooksInstalled = false;

function cleanupOwned(): void {
  for (const name of [...ownedLabs]) {
    teardownSync(name);
    ownedLabs.delete(name);
  }
}
const onExit = (): void => cleanupOwned();
const onUncaught = (): void => cleanupOwned(); // 'uncaughtExceptionMonitor': default crash behaviour is kept
const onSignal = (sig: NodeJS.Signals): void => {
  cleanupOwned();
  process.exit(sig === 'SIGINT' ? 130 : 143);
};

function own(name: string): void {
  ownedLabs.add(name);
  if (hooksInstalled) return;
  hooksInstalled = true;
  process.on('exit', onExit);
  process.on('uncaughtExceptionMonitor', onUncaught);
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
}

function disown(name: string): void {
  ownedLabs.delete(name);
  if (!hooksInstalled || ownedLabs.size) return;
  hooksInstalled = false;
  process.off('exit', onExit);
  process.off('uncaughtExceptionMonitor', onUncaught);
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);
}

function spawnWatchdog(name: string): void {
  const script = path.join(PKG_ROOT, 'dist', 'watchdog.js');
  if (!fs.existsSync(script)) {
    process.emitWarning(`@tern/lab: ${script} missing (run the build); lab ${name} has no watchdog against SIGKILL`);
    return;
  }
  const w = cpSpawn(process.execPath, [script, name, String(process.pid)], {
    detached: true,
    stdio: 'ignore',
    cwd: '/',
  });
  w.on('error', () => {});
  w.unref();
}

// ---------------------------------------------------------------- host init

async function startInit(ns: string, host: string, initBin: string): Promise<{ pid: number; start: string }> {
  const child = cpSpawn(
    'ip',
    ['netns', 'exec', ns, 'unshare', '--pid', '--mount', '--uts', '--fork', '--mount-proc', '--propagation', 'private', initBin, host],
    { detached: true, stdio: ['ignore', 'pipe', 'pipe'], cwd: '/' },
  );
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`lab: init of ${host} not ready after 10 s: ${err.trim()}`)), 10_000);
      const done = (e?: Error) => {
        clearTimeout(timer);
        child.stdout!.off('data', check);
        child.off('exit', onExit);
        child.off('error', done);
        if (e) reject(e);
        else resolve();
      };
      const check = () => {
        if (out.includes('ready\n')) done();
      };
      const onExit = (code: number | null, sig: string | null) =>
        done(new Error(`lab: init of ${host} exited (${code ?? sig}) before ready: ${err.trim()}`));
      child.stdout!.on('data', check);
      child.once('exit', onExit);
      child.once('error', done);
    });
    if (!child.pid) throw new Error(`lab: no pid for init of ${host}`);
    let initPid: number | null = null;
    for (let i = 0; i < 100 && initPid == null; i++) {
      initPid = findNsInit(child.pid);
      if (initPid == null) await sleep(10);
    }
    if (initPid == null) throw new Error(`lab: cannot find the init process of ${host} under pid ${child.pid}`);
    const start = procStartTime(initPid);
    if (start == null) throw new Error(`lab: init of ${host} vanished`);
    return { pid: initPid, start };
  } finally {
    child.stdout!.destroy();
    child.stderr!.destroy();
    child.unref();
  }
}

// ---------------------------------------------------------------- Lab

export class Lab {
  readonly info: LabInfo;
  private destroyed = false;

  private constructor(info: LabInfo) {
    this.info = info;
  }

  static async create(opts: CreateOptions = {}): Promise<Lab> {
    const name = opts.name ?? randomName();
    validateName(name);
    const nHosts = opts.hosts ?? 2;
    if (!Number.isInteger(nHosts) || nHosts < 1 || nHosts > MAX_HOSTS) {
      throw new Error(`lab: hosts must be an integer in 1..${MAX_HOSTS}, got ${nHosts}`);
    }
    if (process.getuid?.() !== 0) throw new Error('lab: must run as root (network/pid namespaces)');
    const owned = opts.owned ?? true;
    const initBin = ensureInitBinary();
    await reapStale();

    const st: LabState = {
      version: 1,
      status: 'creating',
      name,
      hosts: Array.from({ length: nHosts }, (_, i) => ({
        name: `host${hostLetter(i)}`,
        netns: netnsName(name, `host${hostLetter(i)}`),
        address: hostAddress(i),
        initPid: 0,
      })),
      client: { netns: netnsName(name, 'client'), address: CLIENT_ADDRESS },
      serviceAddress: SERVICE_ADDRESS,
      serviceHost: 'hostA',
      subnet: SUBNET,
      // the creator owns the lab while it is being built, even for owned: false (`lab up`),
      // so a creator killed midway leaves nothing behind
      ownerPid: process.pid,
      ownerStart: procStartTime(process.pid),
      initStarts: {},
      createdAt: new Date().toISOString(),
    };
    createStateExclusive(st); // before any kernel object: see orphanNetnsLabNames()
    own(name);
    spawnWatchdog(name);

    let steps = 0;
    const step = () => {
      steps++;
      if (opts.failAfterSteps !== undefined && steps >= opts.failAfterSteps) {
        throw new Error(`lab: injected failure after step ${steps}`);
      }
    };
    try {
      const sw = netnsName(name, 'sw');
      await ip('netns', 'add', sw);
      await ip('-n', sw, 'link', 'set', 'lo', 'up');
      await ip('-n', sw, 'link', 'add', 'br0', 'type', 'bridge');
      await ip('-n', sw, 'link', 'set', 'br0', 'up');
      step();

      const plug = async (ns: string, part: string, addrs: string[]) => {
        await ip('netns', 'add', ns);
        await ip('-n', sw, 'link', 'add', `v-${part}`, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns);
        await ip('-n', sw, 'link', 'set', `v-${part}`, 'master', 'br0', 'up');
        await ip('-n', ns, 'link', 'set', 'lo', 'up');
        for (const a of addrs) await ip('-n', ns, 'addr', 'add', a, 'dev', 'eth0');
        await ip('-n', ns, 'link', 'set', 'eth0', 'up');
      };
      await plug(st.client.netns, 'client', [`${CLIENT_ADDRESS}/24`]);
      step();
      for (const h of st.hosts) {
        const addrs = [`${h.address}/24`];
        if (h.name === st.serviceHost) addrs.push(`${SERVICE_ADDRESS}/32`);
        await plug(h.netns, h.name, addrs);
        step();
      }
      const inits = await Promise.all(st.hosts.map((h) => startInit(h.netns, h.name, initBin)));
      inits.forEach((r, i) => {
        st.hosts[i]!.initPid = r.pid;
        st.initStarts[st.hosts[i]!.name] = r.start;
      });
      // Each host hands out pids from its own range (hostA 10001…, hostB 20001…), as separate
      // machines effectively do: a process keeps its pid when it moves, so the pid it had on one
      // host must be free on the other.
      await Promise.all(
        st.hosts.map((h, i) =>
          execP('nsenter', ['--target', String(h.initPid), '--pid', '--mount', '--', 'sh', '-c', `echo ${(i + 1) * PID_RANGE} > /proc/sys/kernel/ns_last_pid`]),
        ),
      );
      // `ip netns exec` gave each host a fresh /sys without the cgroup mounts a real host has;
      // the agents need them (auto-converge throttles through the cpu controller).
      const cgroups = cgroupMountScript();
      if (cgroups) await Promise.all(st.hosts.map((h) => execP('nsenter', ['--target', String(h.initPid), '--mount', '--', 'sh', '-c', cgroups])));
      step();

      st.status = 'ready';
      if (!owned) {
        st.ownerPid = null;
        st.ownerStart = null;
      }
      writeState(st);
      if (!owned) disown(name); // the watchdog exits when it sees the owner cleared
    } catch (e) {
      teardownSync(name);
      disown(name);
      throw e;
    }
    return new Lab(publicInfo(st));
  }

  /** A handle on an existing lab (from its state file); the caller does not own it. */
  static async attach(name: string): Promise<Lab> {
    validateName(name);
    const st = readState(name);
    if (!st) throw new Error(`lab ${name} does not exist`);
    if (st.status !== 'ready') throw new Error(`lab ${name} is still being created`);
    return new Lab(publicInfo(st));
  }

  get name(): string {
    return this.info.name;
  }

  host(name: string): LabHostInfo {
    const h = this.info.hosts.find((x) => x.name === name);
    if (!h) throw new Error(`lab ${this.info.name}: unknown host ${JSON.stringify(name)} (have ${this.info.hosts.map((x) => x.name).join(', ')})`);
    return h;
  }

  /**
   * Command prefix that runs argv inside `host`: nsenter into its net/pid/mount/uts namespaces
   * (nsenter forks, so the command is in the host's pid ns), with the working directory `cwd`
   * (default: ours — entering a mount ns would otherwise reset it to /). For 'client':
   * `ip netns exec <client netns>` (network namespace only).
   */
  nsenterArgs(host: string, cwd: string = process.cwd()): string[] {
    if (host === 'client') return ['ip', 'netns', 'exec', this.info.client.netns];
    const h = this.host(host);
    return ['nsenter', '--target', String(h.initPid), '--net', '--pid', '--mount', '--uts', `--wd=${cwd}`, '--'];
  }

  /**
   * Spawns argv inside `host` (or 'client'). Detached by default (own process group) and
   * `child.kill(sig)` signals the whole group, so it reaches the command and not only nsenter.
   */
  spawn(host: string, argv: string[], opts: SpawnOptions = {}): ChildProcess {
    if (!argv.length) throw new Error('lab: empty argv');
    const cwd = typeof opts.cwd === 'string' ? opts.cwd : opts.cwd ? opts.cwd.pathname : process.cwd();
    const pre = this.nsenterArgs(host, cwd);
    const detached = opts.detached ?? true;
    const child = cpSpawn(pre[0]!, [...pre.slice(1), ...argv], { ...opts, detached });
    if (detached) {
      const orig = child.kill.bind(child);
      child.kill = (sig?: NodeJS.Signals | number): boolean => {
        if (child.pid && child.exitCode === null && child.signalCode === null) {
          try {
            process.kill(-child.pid, sig ?? 'SIGTERM');
            return true;
          } catch {
            /* fall back */
          }
        }
        return orig(sig);
      };
    }
    return child;
  }

  /** Runs argv inside `host` to completion (default timeout 60 s, then SIGKILL of its process group). */
  async run(host: string, argv: string[], opts: { timeoutMs?: number; input?: string } = {}): Promise<ExecResult> {
    const child = this.spawn(host, argv, { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.stdin!.on('error', () => {});
    child.stdin!.end(opts.input ?? '');
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    try {
      return await new Promise<ExecResult>((resolve, reject) => {
        child.once('error', reject);
        child.once('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
      });
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Starts argv detached inside `host` (stdin /dev/null, stdout+stderr appended to logFile or
   * /dev/null, reparented to the host init). Returns its pid in the host's pid ns and in the root ns.
   */
  async startDaemon(host: string, argv: string[], opts: { logFile?: string } = {}): Promise<{ pid: number; rootPid: number }> {
    if (host === 'client') throw new Error('lab: startDaemon needs a host (the client has no pid namespace)');
    this.host(host);
    const log = opts.logFile ? path.resolve(opts.logFile) : '/dev/null';
    const r = await this.run(host, ['sh', '-c', 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!', 'sh', log, ...argv], {
      timeoutMs: 10_000,
    });
    const pid = Number(r.stdout.trim());
    if (r.code !== 0 || !Number.isInteger(pid) || pid <= 0) {
      throw new Error(`lab: startDaemon ${argv.join(' ')} in ${host} failed (${r.code ?? r.signal}): ${r.stderr.trim()}`);
    }
    return { pid, rootPid: this.toRootPid(host, pid) };
  }

  /** Root-namespace pid of the process that is `nsPid` in `host`'s pid namespace; throws if none. */
  toRootPid(host: string, nsPid: number): number {
    const h = this.host(host);
    if (nsPid === 1) return h.initPid;
    const pidNs = nsLink(h.initPid, 'pid');
    if (!pidNs) throw new Error(`lab ${this.info.name}: init of ${host} (pid ${h.initPid}) is gone`);
    const p = findRootPid(pidNs, nsPid);
    if (p == null) throw new Error(`lab ${this.info.name}: no process ${nsPid} in ${host}`);
    return p;
  }

  /** Which host (and pid there) a root-namespace pid lives in, or null if it is in none of the lab's hosts. */
  toHostPid(rootPid: number): { host: string; pid: number } | null {
    const pidNs = nsLink(rootPid, 'pid');
    const ns = nsPids(rootPid);
    if (!pidNs || !ns || ns.length < 2) return null;
    for (const h of this.info.hosts) {
      if (nsLink(h.initPid, 'pid') === pidNs) return { host: h.name, pid: ns[ns.length - 1]! };
    }
    return null;
  }

  /**
   * Starts a Tern agent in every host (`tern-agent`, inside the host's namespaces, listening on the
   * host's address) with a generated cluster token, and records them in the lab state. Idempotent.
   */
  async startAgents(opts: { port?: number } = {}): Promise<LabAgents> {
    const st = readState(this.info.name);
    if (!st) throw new Error(`lab ${this.info.name} does not exist`);
    if (st.agents) return st.agents;
    const bin = process.env['TERN_AGENT_BIN'] ?? path.join(PKG_ROOT, '..', '..', 'apps', 'agent', 'dist', 'server.js');
    if (!fs.existsSync(bin)) throw new Error(`lab: the agent is not built (${bin} is missing): run npm run build`);
    const port = opts.port ?? AGENT_PORT;
    const dir = agentsDir(this.info.name);
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const agents: LabAgents = { port, clusterToken: randomBytes(24).toString('hex'), hosts: {} };
    for (const h of this.info.hosts) {
      const config = path.join(dir, `${h.name}.json`);
      const log = path.join(dir, `${h.name}.log`);
      fs.writeFileSync(config, JSON.stringify({ name: h.name, listen: h.address, port, clusterToken: agents.clusterToken, serviceAddresses: [`${SERVICE_ADDRESS}/32`] }, null, 2) + '\n', { mode: 0o600 });
      const { pid } = await this.startDaemon(h.name, [process.execPath, bin, '--config', config], { logFile: log });
      agents.hosts[h.name] = { url: `http://${h.address}:${port}`, pid, log, config };
    }
    // Ready when every agent answers /healthz from the client namespace (where the coordinator of
    // `migrate --lab` runs).
    const urls = Object.values(agents.hosts).map((a) => `${a.url}/healthz`);
    const probe = `const urls=${JSON.stringify(urls)};const end=Date.now()+15000;(async()=>{for(const u of urls){for(;;){try{if((await fetch(u)).ok)break}catch{}if(Date.now()>end){console.error('no answer from '+u);process.exit(1)}await new Promise(r=>setTimeout(r,50))}}})()`;
    const r = await this.run('client', [process.execPath, '-e', probe], { timeoutMs: 20_000 });
    if (r.code !== 0) {
      const logs = Object.values(agents.hosts).map((a) => { try { return fs.readFileSync(a.log, 'utf8').slice(-2000); } catch { return ''; } }).join('\n');
      throw new Error(`lab ${this.info.name}: agents did not come up: ${r.stderr.trim()}\n${logs}`);
    }
    const now = readState(this.info.name);
    if (!now) throw new Error(`lab ${this.info.name} vanished while starting agents`);
    now.agents = agents;
    writeState(now);
    this.info.agentUrls = Object.fromEntries(Object.entries(agents.hosts).map(([n, a]) => [n, a.url]));
    return agents;
  }

  /** The lab's agents (with their cluster token), or null if it runs none. */
  agents(): LabAgents | null {
    return readState(this.info.name)?.agents ?? null;
  }

  /**
   * Moves 10.77.0.200/32 to `toHost`'s eth0 and makes the client (and hosts) re-resolve it.
   * (The lab's agents are configured with this address as a service address, so a migration of a
   * process serving on it moves it by itself; this is for moving it by hand.)
   */
  async moveServiceAddress(toHost: string): Promise<void> {
    const to = this.host(toHost);
    const svc = `${SERVICE_ADDRESS}/32`;
    // Wherever it is now (the agents move it themselves during a migration), it ends on toHost only.
    for (const h of this.info.hosts) {
      if (h.name !== toHost) await ip('-n', h.netns, 'addr', 'del', svc, 'dev', 'eth0').catch(() => {});
    }
    await ip('-n', to.netns, 'addr', 'add', svc, 'dev', 'eth0').catch((err: Error) => {
      if (!/File exists/.test(err.message)) throw err;
    });
    const arping = which('arping');
    if (arping) {
      await execP('ip', ['netns', 'exec', to.netns, arping, '-U', '-c', '1', '-I', 'eth0', SERVICE_ADDRESS]).catch(() => {});
    }
    for (const ns of [this.info.client.netns, ...this.info.hosts.map((h) => h.netns)]) {
      await ip('-n', ns, 'neigh', 'flush', 'to', SERVICE_ADDRESS).catch(() => {});
    }
    this.info.serviceHost = toHost;
    const st = readState(this.info.name);
    if (st) {
      st.serviceHost = toHost;
      writeState(st);
    }
  }

  /** Kills every process of the lab, deletes its namespaces and state file. Idempotent. */
  async destroy(): Promise<void> {
    this.destroyed = true;
    teardownSync(this.info.name);
    disown(this.info.name);
  }

  get isDestroyed(): boolean {
    return this.destroyed || !fs.existsSync(path.join('/run/netns', this.info.client.netns));
  }
}

export async function listLabs(): Promise<LabInfo[]> {
  const out: LabInfo[] = [];
  for (const n of listStateNames()) {
    const st = readState(n);
    if (st) out.push(publicInfo(st));
  }
  return out;
}

export async function destroyLab(name: string): Promise<void> {
  validateName(name);
  teardownSync(name);
  disown(name);
}

/** Removes labs whose owner process is dead, and lab netns without a state file. Returns their names. */
export async function reapStale(): Promise<string[]> {
  const names = [...new Set([...staleLabNames(), ...orphanNetnsLabNames()])];
  for (const n of names) teardownSync(n);
  return names;
}

/** For tools: is `pid` (root ns) alive with the given starttime. */
export { pidAlive };

/**
 * Shell commands that mount, in a lab host's mount namespace, the cgroup hierarchies this machine
 * has under /sys/fs/cgroup (the same hierarchies: mounting a v1 controller again attaches to its
 * existing hierarchy). Empty when there are none.
 */
function cgroupMountScript(): string {
  let info = '';
  try {
    info = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return '';
  }
  const cmds: string[] = [];
  for (const line of info.split('\n')) {
    const [pre, post] = line.split(' - ');
    if (!pre || !post) continue;
    const mountPoint = pre.split(' ')[4];
    const [fstype, , superOpts] = post.split(' ');
    if (!mountPoint || !mountPoint.startsWith('/sys/fs/cgroup')) continue;
    if (fstype === 'tmpfs' && mountPoint === '/sys/fs/cgroup') cmds.push('mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup');
    else if (fstype === 'cgroup' || fstype === 'cgroup2') {
      const opts = (superOpts ?? '').split(',').filter((o) => o !== 'rw' && o !== 'ro').join(',');
      cmds.push(`mkdir -p ${mountPoint} && mount -t ${fstype}${opts ? ` -o ${opts}` : ''} ${fstype} ${mountPoint}`);
    }
  }
  // Best effort: a lab without them still works, only auto-converge reports itself unavailable.
  return cmds.length ? `${cmds.join('; ')}; true` : '';
}
