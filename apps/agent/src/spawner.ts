/**
 * The agent's command spawner: a small long-lived child process, started with the agent (while
 * the agent is still small), that runs the agent's commands (ip(8) of the address handoff, nft(8)
 * of the network lock and the restore guard, arping / ndisc6, ss(8), the user's address hook) on
 * its behalf.
 *
 * Why: a destination agent holds the migration's page store in its own memory, gigabytes after a
 * pre-copy. Starting a command forks the process that starts it, and libuv's fork copies the page
 * tables of everything that process maps, synchronously, with the event loop blocked. Measured:
 * `spawnSync('true')` from a node holding 2 GiB of touched Buffers takes 130-210 ms, against
 * 1.6-2.5 ms from a small node. One such spawn (the address claim) sits inside the migration's
 * downtime; others delay the restore's answer and the homing watchers. Forking the small spawner
 * instead costs what a small node's fork costs; the agent only exchanges a message with it.
 *
 * Failure handling, correctness over speed: a spawner that died (or was never started) is started
 * again by the next command; if it cannot be started the command runs directly from the agent
 * (counted in `fallbacks`, logged). A command in flight when the spawner dies is rejected (it may
 * or may not have run), never left hanging. The spawner exits when its IPC channel closes, so it
 * never outlives the agent, and its channel does not keep the agent alive while idle.
 *
 * {@link runCommand} is the process-wide entry point used by network.ts and tcp-resume.ts: it goes
 * through the shared spawner while one is acquired ({@link acquireCommandSpawner}, by the agent
 * app) and straight to execFile otherwise (the unit tests that call network.ts functions directly).
 */
import { execFile, fork, type ChildProcess, type ExecFileException } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export interface RunOptions {
  /** Written to the command's stdin, which is then closed. */
  input?: string;
  /** Kills the command (SIGTERM) after this long, like execFile's `timeout`. */
  timeoutMs?: number;
  /** The command's whole environment (default: the agent's, as it was when the spawner started). */
  env?: NodeJS.ProcessEnv;
  /** Like execFile's `maxBuffer` (default 1 MiB per stream). */
  maxBuffer?: number;
}

export interface RunResult {
  stdout: string;
  stderr: string;
}

/** What a failed command rejects with: the same error promisified execFile rejects with. */
export type CommandError = Error & {
  /** The exit code, or an errno string ('ENOENT'), or null when a signal ended the command. */
  code?: number | string | null;
  signal?: NodeJS.Signals | null;
  killed?: boolean;
  cmd?: string;
  errno?: number;
  syscall?: string;
  path?: string;
  spawnargs?: string[];
  stdout: string;
  stderr: string;
};

// ---------------------------------------------------------------- the wire (both sides)

/** agent → spawner. */
export interface SpawnRequest {
  id: number;
  file: string;
  args: string[];
  input?: string;
  timeoutMs?: number;
  env?: Record<string, string>;
  maxBuffer?: number;
}

/** The parts of execFile's error that do not travel in the reply's other fields. */
export interface SpawnErrorInfo {
  message: string;
  name?: string;
  killed?: boolean;
  errno?: number;
  syscall?: string;
  path?: string;
  spawnargs?: string[];
}

/** spawner → agent: one per request; `error` is set when the command failed (code 0 otherwise). */
export interface SpawnReply {
  id: number;
  code: number | string | null;
  signal: string | null;
  stdout: string;
  stderr: string;
  error?: SpawnErrorInfo;
}

/** spawner → agent, once, when it listens. */
export interface SpawnReady {
  ready: true;
  pid: number;
}

const isRecord = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
/** A request id: a non-negative safe integer. */
export const isId = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
const optional = (v: unknown, ok: (v: unknown) => boolean) => v === undefined || ok(v);
const isString = (v: unknown): v is string => typeof v === 'string';
const isStringArray = (v: unknown): v is string[] => Array.isArray(v) && v.every(isString);

/** A request as the spawner receives it: a string saying what is wrong with it, or the request. */
export function validateRequest(m: unknown): SpawnRequest | string {
  if (!isRecord(m)) return 'not an object';
  if (!isId(m['id'])) return 'id is not a non-negative integer';
  if (!isString(m['file']) || m['file'] === '') return 'file is not a non-empty string';
  if (!isStringArray(m['args'])) return 'args is not an array of strings';
  if (!optional(m['input'], isString)) return 'input is not a string';
  if (!optional(m['timeoutMs'], (v) => typeof v === 'number' && Number.isFinite(v) && v >= 0)) return 'timeoutMs is not a non-negative number';
  if (!optional(m['maxBuffer'], (v) => typeof v === 'number' && v > 0)) return 'maxBuffer is not a positive number';
  if (!optional(m['env'], (v) => isRecord(v) && Object.values(v).every(isString))) return 'env is not a record of strings';
  const r: SpawnRequest = { id: m['id'], file: m['file'], args: m['args'] };
  if (m['input'] !== undefined) r.input = m['input'] as string;
  if (m['timeoutMs'] !== undefined) r.timeoutMs = m['timeoutMs'] as number;
  if (m['maxBuffer'] !== undefined) r.maxBuffer = m['maxBuffer'] as number;
  if (m['env'] !== undefined) r.env = m['env'] as Record<string, string>;
  return r;
}

function validateReply(m: unknown): SpawnReply | null {
  if (!isRecord(m) || !isId(m['id'])) return null;
  const code = m['code'];
  if (!(code === null || isString(code) || (typeof code === 'number' && Number.isInteger(code)))) return null;
  if (!(m['signal'] === null || isString(m['signal'])) || !isString(m['stdout']) || !isString(m['stderr'])) return null;
  const e = m['error'];
  if (e !== undefined && !(isRecord(e) && isString(e['message']))) return null;
  return m as unknown as SpawnReply;
}

const isReady = (m: unknown): m is SpawnReady => isRecord(m) && m['ready'] === true && isId(m['pid']);

// ---------------------------------------------------------------- running a command

/**
 * execFile with `input` written to stdin (then closed), utf8 output; the callback gets execFile's
 * error. Used by the spawner for every command, and by the agent when it runs one directly.
 */
export function execCommand(
  file: string,
  args: string[],
  opts: RunOptions,
  cb: (err: ExecFileException | null, stdout: string, stderr: string) => void,
): void {
  let child: ChildProcess;
  try {
    child = execFile(
      file,
      args,
      {
        encoding: 'utf8',
        ...(opts.timeoutMs !== undefined && { timeout: opts.timeoutMs }),
        ...(opts.maxBuffer !== undefined && { maxBuffer: opts.maxBuffer }),
        ...(opts.env !== undefined && { env: opts.env }),
      },
      (err, stdout, stderr) => cb(err, String(stdout), String(stderr)),
    );
  } catch (err) {
    // Arguments execFile refuses outright (a NUL byte in an argument, say).
    process.nextTick(cb, err as ExecFileException, '', '');
    return;
  }
  if (opts.input !== undefined) {
    // A command that exits without reading its input: EPIPE, which is not the command's failure.
    child.stdin?.on('error', () => {});
    child.stdin?.end(opts.input);
  }
}

/** The command run from this process, rejecting like promisified execFile. */
export function runDirect(file: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execCommand(file, args, opts, (err, stdout, stderr) => {
      if (err) reject(Object.assign(err, { stdout, stderr }));
      else resolve({ stdout, stderr });
    });
  });
}

function commandError(file: string, args: string[], r: SpawnReply): CommandError {
  const cmd = [file, ...args].join(' ');
  const info = r.error;
  const message = info?.message ?? `Command failed: ${cmd}\n${r.stderr}`;
  const err = (info?.name === 'RangeError' ? new RangeError(message) : new Error(message)) as CommandError;
  if (info?.name && info.name !== err.name) err.name = info.name;
  if (info?.errno !== undefined) err.errno = info.errno;
  err.code = r.code;
  if (info?.syscall !== undefined) err.syscall = info.syscall;
  if (info?.path !== undefined) err.path = info.path;
  if (info?.spawnargs !== undefined) err.spawnargs = info.spawnargs;
  if (info?.killed !== undefined) err.killed = info.killed;
  if (r.signal !== null || info?.killed !== undefined) err.signal = r.signal as NodeJS.Signals | null; // (a spawn error has none)
  err.cmd = cmd;
  err.stdout = r.stdout;
  err.stderr = r.stderr;
  return err;
}

// ---------------------------------------------------------------- the agent's side

export interface CommandSpawnerOptions {
  /** Where problems are told (a start failure, a direct run, the spawner dying). */
  log?: (message: string) => void;
  /** The child's script (default: spawner-child.js next to this module). */
  childPath?: string;
  /** How long a starting spawner has to say it is ready. */
  startTimeoutMs?: number;
  /** After a failed start, commands run directly for this long before a start is tried again. */
  retryAfterMs?: number;
}

interface Pending {
  child: ChildProcess;
  file: string;
  args: string[];
  resolve: (r: RunResult) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout | null;
}

export class CommandSpawner {
  private child: ChildProcess | null = null;
  private starting: Promise<boolean> | null = null;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private closed = false;
  private lastStartFailure = -Infinity;
  private lastFallbackLog = -Infinity;
  private readonly childPath: string;
  private readonly log: (message: string) => void;
  /** Spawner processes started. */
  starts = 0;
  /** Commands run directly from the agent because no spawner could be started. */
  fallbacks = 0;

  constructor(private readonly opts: CommandSpawnerOptions = {}) {
    this.childPath = opts.childPath ?? fileURLToPath(new URL('./spawner-child.js', import.meta.url));
    this.log = opts.log ?? ((m) => process.stderr.write(`tern-agent: ${m}\n`));
  }

  /** The running spawner's pid (null: none running). */
  get pid(): number | null {
    return this.child?.pid ?? null;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Starts the spawner (if it is not running); true once it is ready, false if it could not start. */
  start(): Promise<boolean> {
    this.closed = false;
    if (this.child) return Promise.resolve(true);
    this.starting ??= this.spawnChild().finally(() => (this.starting = null));
    return this.starting;
  }

  /** Runs `file args` through the spawner; resolves or rejects like promisified execFile. */
  async run(file: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
    if (this.closed) return await runDirect(file, args, opts);
    let child = this.child;
    if (!child) {
      if (performance.now() - this.lastStartFailure >= (this.opts.retryAfterMs ?? 1000) || this.starting) await this.start();
      child = this.child;
      if (!child) {
        this.fallbacks++;
        if (performance.now() - this.lastFallbackLog >= 10_000) {
          this.lastFallbackLog = performance.now();
          this.log(`command spawner not running: running ${file} directly (the agent's fork may be slow; ${this.fallbacks} run so far)`);
        }
        return await runDirect(file, args, opts);
      }
    }
    return await this.request(child, file, args, opts);
  }

  /** Stops the spawner; commands in flight are rejected, later ones run directly. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.starting) await this.starting;
    const child = this.child;
    this.child = null;
    if (!child) return;
    this.lost(child, 'the command spawner was closed');
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.ref(); // until it is gone
    // It exits when its channel closes; a spawner that does not is killed.
    const kill = setTimeout(() => child.kill('SIGKILL'), 2000);
    if (child.connected) child.disconnect();
    else child.kill('SIGKILL');
    await exited;
    clearTimeout(kill);
  }

  private spawnChild(): Promise<boolean> {
    return new Promise<boolean>((resolve) => {
      let ready = false;
      let child: ChildProcess;
      const fail = (why: string) => {
        if (ready) return;
        ready = true; // settled
        clearTimeout(timer);
        this.lastStartFailure = performance.now();
        this.log(`could not start the command spawner: ${why}`);
        if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        resolve(false);
      };
      const timer = setTimeout(() => fail(`no answer in ${this.opts.startTimeoutMs ?? 10_000} ms`), this.opts.startTimeoutMs ?? 10_000);
      try {
        child = fork(this.childPath, [], {
          serialization: 'advanced',
          // Its stderr is the agent's (the agent's log); it never writes to stdout.
          stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
          // Not the agent's flags (a test runner's loaders, heap sizes): a plain small node.
          execArgv: [],
        });
      } catch (err) {
        fail((err as Error).message);
        return;
      }
      this.starts++;
      child.on('error', (err) => {
        if (!ready) fail(err.message);
        else this.log(`command spawner (pid ${child.pid}): ${err.message}`);
      });
      child.on('message', (m: unknown) => {
        if (!ready) {
          if (!isReady(m)) return fail('its first message was not a ready message');
          ready = true;
          clearTimeout(timer);
          this.child = child; // (a close() waiting for this start stops it next)
          this.idle(child);
          return resolve(true);
        }
        this.onReply(m);
      });
      const gone = (what: string) => {
        if (!ready) return fail(what);
        if (this.child === child) this.child = null;
        this.lost(child, `the command spawner (pid ${child.pid}) ${what}`);
      };
      child.on('exit', (code, signal) => gone(signal ? `was killed by ${signal}` : `exited with code ${code}`));
      child.on('disconnect', () => {
        if (!ready) return fail('closed its channel');
        if (this.child === child) this.child = null; // the next command starts another
        // Its exit follows at once when it died (and says how, for the commands in flight); one
        // that dropped its channel but lives on is of no use to anyone.
        setTimeout(() => {
          gone('closed its channel');
          if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        }, 200);
      });
      // The process itself never keeps the agent alive; its channel only while a command runs.
      child.unref();
    });
  }

  private request(child: ChildProcess, file: string, args: string[], opts: RunOptions): Promise<RunResult> {
    return new Promise<RunResult>((resolve, reject) => {
      const id = this.nextId++;
      const msg: SpawnRequest = { id, file, args };
      if (opts.input !== undefined) msg.input = opts.input;
      if (opts.timeoutMs !== undefined) msg.timeoutMs = opts.timeoutMs;
      if (opts.maxBuffer !== undefined) msg.maxBuffer = opts.maxBuffer;
      if (opts.env !== undefined) {
        msg.env = {};
        for (const [k, v] of Object.entries(opts.env)) if (v !== undefined) msg.env[k] = v;
      }
      // A spawner alive but stuck must not leave a command with a deadline hanging either.
      const timer =
        opts.timeoutMs !== undefined
          ? setTimeout(() => this.settle(id, new Error(`${file}: no answer from the command spawner ${opts.timeoutMs! + 10_000} ms after the command was sent`)), opts.timeoutMs + 10_000).unref()
          : null;
      this.pending.set(id, { child, file, args, resolve, reject, timer });
      // While a command is in flight its answer (or the spawner's end) keeps the agent alive.
      child.ref();
      child.channel?.ref();
      try {
        child.send(msg, (err: Error | null) => {
          if (err) this.settle(id, new Error(`${file}: could not hand the command to the command spawner: ${err.message}`));
        });
      } catch (err) {
        this.settle(id, new Error(`${file}: could not hand the command to the command spawner: ${(err as Error).message}`));
      }
    });
  }

  private onReply(m: unknown): void {
    const r = validateReply(m);
    if (!r) {
      const id = isRecord(m) && isId(m['id']) ? m['id'] : null;
      this.log(`malformed message from the command spawner${id === null ? '' : ` (request ${id})`}: ignored`);
      if (id !== null) this.settle(id, new Error('malformed answer from the command spawner'));
      return;
    }
    const p = this.pending.get(r.id);
    if (!p) return; // already rejected (its spawner was given up, or its deadline passed)
    this.settle(r.id, r.error ? commandError(p.file, p.args, r) : { stdout: r.stdout, stderr: r.stderr });
  }

  private settle(id: number, outcome: RunResult | Error): void {
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    if (p.timer) clearTimeout(p.timer);
    if (outcome instanceof Error) p.reject(outcome);
    else p.resolve(outcome);
    this.idle(p.child);
  }

  /** Lets the agent exit while no command is in flight on `child`. */
  private idle(child: ChildProcess): void {
    for (const p of this.pending.values()) if (p.child === child) return;
    child.unref();
    try {
      child.channel?.unref();
    } catch {
      // channel already gone
    }
  }

  /** Rejects every command in flight on `child`: it is gone. */
  private lost(child: ChildProcess, why: string): void {
    for (const [id, p] of this.pending) {
      if (p.child !== child) continue;
      this.settle(id, new Error(`${[p.file, ...p.args].join(' ')}: ${why} while the command was in flight (it may or may not have run)`));
    }
  }
}

// ---------------------------------------------------------------- the process-wide instance

let shared: CommandSpawner | null = null;
let users = 0;

/**
 * Starts the process-wide spawner (the first caller does) for {@link runCommand}; the function
 * returned gives it back, and the last one stops it. The agent app calls this when it is built
 * (the agent's start, while it is small) and gives it back when it closes.
 */
export function acquireCommandSpawner(opts: CommandSpawnerOptions = {}): () => Promise<void> {
  users++;
  if (!shared || shared.isClosed) {
    shared = new CommandSpawner(opts);
    void shared.start();
  }
  const mine = shared;
  let released = false;
  return async () => {
    if (released) return;
    released = true;
    if (--users === 0 && shared === mine) {
      shared = null;
      await mine.close();
    }
  };
}

/** Runs a command for the agent: through its spawner while one is acquired, directly otherwise. */
export function runCommand(file: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return shared && !shared.isClosed ? shared.run(file, args, opts) : runDirect(file, args, opts);
}

/** The process-wide spawner, if one is acquired (tests and diagnostics). */
export function sharedCommandSpawner(): CommandSpawner | null {
  return shared;
}
