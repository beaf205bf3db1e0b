/**
 * Where `migrate` sends its requests: a coordinator over HTTP (--coordinator URL), or one embedded in
 * this process against the agents of a config file or a lab — so one machine needs no extra daemon.
 * Both behave the same to the commands: create, get, list, abort, follow a migration's events.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import WebSocket from 'ws';
import { Coordinator, CoordinatorError, MigrationStore, parseHosts } from '@tern/coordinator';
import { coordinatorDbPath, listLabs, Lab } from '@tern/lab';
import type { CreateMigrationRequest, HostRecord, MigrationEvent, MigrationRecord } from '@tern/protocol';
import { CliError, EXIT } from './exit-codes.js';

/** A refusal by the coordinator (HTTP status and machine code), or its absence (status 0). */
export class ControlError extends Error {
  override name = 'ControlError';
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

export interface Control {
  /** Where the requests go, for messages ("coordinator http://…", "embedded coordinator (lab demo)"). */
  readonly description: string;
  create(req: CreateMigrationRequest): Promise<MigrationRecord>;
  get(id: string): Promise<MigrationRecord>;
  list(limit?: number): Promise<MigrationRecord[]>;
  abort(id: string): Promise<MigrationRecord>;
  /** The stored events of a migration. */
  events(id: string): Promise<MigrationEvent[]>;
  /** Every event of the migration, past ones first; resolves with the final record. */
  follow(id: string, onEvent: (e: MigrationEvent) => void): Promise<MigrationRecord>;
  close(): Promise<void>;
}

// ---------------------------------------------------------------- remote

export class RemoteControl implements Control {
  readonly description: string;
  constructor(
    private readonly url: string,
    private readonly token: string,
  ) {
    this.description = `coordinator ${url}`;
  }

  private async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    let res: Response;
    try {
      res = await fetch(new URL(path, this.url), {
        method,
        headers: { authorization: `Bearer ${this.token}`, ...(body !== undefined && { 'content-type': 'application/json' }) },
        ...(body !== undefined && { body: JSON.stringify(body) }),
        signal: AbortSignal.timeout(120_000),
      });
    } catch (err) {
      const cause = (err as { cause?: { code?: string } }).cause?.code ?? (err as Error).message;
      throw new ControlError(0, 'unreachable', `coordinator ${this.url} unreachable: ${cause}`);
    }
    const json = (await res.json().catch(() => ({}))) as { error?: string; message?: string };
    if (!res.ok) throw new ControlError(res.status, json.error ?? 'error', json.message ?? `HTTP ${res.status}`);
    return json as T;
  }

  create(req: CreateMigrationRequest): Promise<MigrationRecord> {
    return this.call('POST', '/migrations', req);
  }
  get(id: string): Promise<MigrationRecord> {
    return this.call('GET', `/migrations/${encodeURIComponent(id)}`);
  }
  async list(limit = 50): Promise<MigrationRecord[]> {
    return (await this.call<{ migrations: MigrationRecord[] }>('GET', `/migrations?limit=${limit}`)).migrations;
  }
  abort(id: string): Promise<MigrationRecord> {
    return this.call('POST', `/migrations/${encodeURIComponent(id)}/abort`);
  }
  events(id: string): Promise<MigrationEvent[]> {
    return this.call('GET', `/migrations/${encodeURIComponent(id)}/events`);
  }

  follow(id: string, onEvent: (e: MigrationEvent) => void): Promise<MigrationRecord> {
    const wsUrl = new URL(`/migrations/${encodeURIComponent(id)}/events`, this.url);
    wsUrl.protocol = wsUrl.protocol === 'https:' ? 'wss:' : 'ws:';
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(wsUrl, { headers: { authorization: `Bearer ${this.token}` } });
      let result: MigrationRecord | undefined;
      ws.on('message', (data) => {
        const e = JSON.parse(data.toString()) as MigrationEvent;
        onEvent(e);
        if (e.type === 'result' && e.record) result = e.record;
      });
      ws.on('unexpected-response', (_req, res) => {
        reject(new ControlError(res.statusCode ?? 0, 'events', `event stream of ${id}: HTTP ${res.statusCode}`));
        ws.terminate();
      });
      ws.on('error', (err) => reject(new ControlError(0, 'unreachable', `event stream of ${id}: ${err.message}`)));
      // Closed without a result (coordinator restarted?): the record says where it stands.
      ws.on('close', () => (result ? resolve(result) : this.get(id).then(resolve, reject)));
    });
  }

  async close(): Promise<void> {}
}

// ---------------------------------------------------------------- embedded

export class EmbeddedControl implements Control {
  readonly coordinator: Coordinator;
  private readonly store: MigrationStore;
  private ready: Promise<void>;

  constructor(
    readonly description: string,
    hosts: HostRecord[],
    clusterToken: string,
    database: string,
  ) {
    this.store = new MigrationStore(database);
    for (const h of hosts) this.store.putHost(h);
    this.coordinator = new Coordinator({ store: this.store, clusterToken });
    // A previous `migrate` killed mid-way left its migration unfinished: resolve it first (bounded).
    const recovery = this.coordinator.recover();
    this.ready = Promise.race([recovery, new Promise<void>((r) => setTimeout(r, 10_000).unref())]);
  }

  private async wrap<T>(fn: () => T | Promise<T>): Promise<T> {
    await this.ready;
    try {
      return await fn();
    } catch (err) {
      if (err instanceof CoordinatorError) throw new ControlError(err.statusCode, err.code, err.message);
      throw err;
    }
  }

  create(req: CreateMigrationRequest): Promise<MigrationRecord> {
    return this.wrap(() => this.coordinator.create(req));
  }
  get(id: string): Promise<MigrationRecord> {
    return this.wrap(() => this.coordinator.get(id));
  }
  list(limit = 50): Promise<MigrationRecord[]> {
    return this.wrap(() => this.coordinator.list({ limit }));
  }
  abort(id: string): Promise<MigrationRecord> {
    return this.wrap(() => this.coordinator.abort(id));
  }
  events(id: string): Promise<MigrationEvent[]> {
    return this.wrap(() => {
      this.coordinator.get(id);
      return this.coordinator.events(id);
    });
  }

  follow(id: string, onEvent: (e: MigrationEvent) => void): Promise<MigrationRecord> {
    return this.wrap(
      () =>
        new Promise<MigrationRecord>((resolve) => {
          let last = 0;
          let replaying = true;
          const queued: MigrationEvent[] = [];
          const deliver = (e: MigrationEvent) => {
            if (e.seq <= last) return;
            last = e.seq;
            onEvent(e);
            if (e.type === 'result') {
              off();
              resolve(e.record ?? this.coordinator.get(id));
            }
          };
          const off = this.coordinator.subscribe(id, (e) => (replaying ? queued.push(e) : deliver(e)));
          for (const e of this.coordinator.events(id)) deliver(e);
          replaying = false;
          for (const e of queued) deliver(e);
        }),
    );
  }

  async close(): Promise<void> {
    await Promise.race([this.coordinator.idle(), new Promise((r) => setTimeout(r, 5_000).unref())]);
    this.coordinator.close();
    this.store.close();
  }
}

// ---------------------------------------------------------------- which one

export interface TargetOptions {
  coordinator?: string;
  token?: string;
  lab?: string;
  config?: string;
}

/** The CLI's config file: TERN_CONFIG, else ./tern.json. */
export interface CliConfig {
  /** A coordinator to talk to instead of embedding one. */
  coordinator?: string;
  apiToken?: string;
  clusterToken?: string;
  hosts?: unknown;
  /** The embedded coordinator's database (default /var/lib/tern/embedded.db). */
  database?: string;
}

export const DEFAULT_EMBEDDED_DATABASE = '/var/lib/tern/embedded.db';

function readConfig(opts: TargetOptions, env: NodeJS.ProcessEnv): { file: string; config: CliConfig } | null {
  const file = opts.config ?? env.TERN_CONFIG ?? (existsSync('tern.json') ? join(process.cwd(), 'tern.json') : undefined);
  if (!file) return null;
  try {
    return { file, config: JSON.parse(readFileSync(file, 'utf8')) as CliConfig };
  } catch (err) {
    throw new CliError(`cannot read config ${file}: ${(err as Error).message}`, EXIT.badInput);
  }
}

/** The network namespace of lab `name`'s client, where `migrate --lab` reaches the agents from. */
export function labClientNetns(name: string): string {
  return `tern-${name}-client`;
}

/** True if this process already runs in lab `name`'s client network namespace. */
export function insideLabClient(name: string): boolean {
  try {
    return statSync('/proc/self/ns/net').ino === statSync(`/run/netns/${labClientNetns(name)}`).ino;
  } catch {
    return false;
  }
}

/**
 * The lab to use when neither --coordinator, --lab nor a config file says otherwise: the only lab
 * that runs agents, if there is exactly one.
 */
export async function defaultLab(opts: TargetOptions, env: NodeJS.ProcessEnv = process.env): Promise<string | null> {
  if (opts.coordinator || opts.lab || readConfig(opts, env)) return null;
  const withAgents = (await listLabs()).filter((l) => l.agentUrls);
  return withAgents.length === 1 ? withAgents[0]!.name : null;
}

export async function openControl(opts: TargetOptions, env: NodeJS.ProcessEnv = process.env): Promise<Control> {
  const file = opts.lab ? null : readConfig(opts, env);
  const config = file?.config ?? {};
  const url = opts.coordinator ?? config.coordinator;
  if (url) {
    const token = opts.token ?? env.TERN_API_TOKEN ?? env.TERN_CLUSTER_TOKEN ?? config.apiToken ?? config.clusterToken;
    if (!token) throw new CliError('a coordinator needs a token: --token, TERN_API_TOKEN or apiToken in the config', EXIT.badInput);
    return new RemoteControl(url, token);
  }
  if (opts.lab) {
    const lab = await Lab.attach(opts.lab).catch((err: Error) => {
      throw new CliError(err.message, EXIT.badInput);
    });
    const agents = lab.agents();
    if (!agents) throw new CliError(`lab ${opts.lab} runs no agents: start it with deploy/lab/lab up ${opts.lab} --agents`, EXIT.badInput);
    const hosts = Object.entries(agents.hosts).map(([name, a]) => ({ name, url: a.url }));
    return new EmbeddedControl(`embedded coordinator (lab ${opts.lab})`, hosts, agents.clusterToken, coordinatorDbPath(opts.lab));
  }
  if (!file) {
    throw new CliError(
      'no coordinator and no agents: give --coordinator URL, --lab NAME, or a config (TERN_CONFIG or ./tern.json) naming the hosts\' agents',
      EXIT.badInput,
    );
  }
  const clusterToken = env.TERN_CLUSTER_TOKEN ?? config.clusterToken;
  if (!clusterToken) throw new CliError(`${file.file}: clusterToken (or TERN_CLUSTER_TOKEN) is needed to reach the agents`, EXIT.badInput);
  let hosts: HostRecord[];
  try {
    hosts = parseHosts(config.hosts, file.file);
  } catch (err) {
    throw new CliError((err as Error).message, EXIT.badInput);
  }
  return new EmbeddedControl(`embedded coordinator (${file.file})`, hosts, clusterToken, env.TERN_COORDINATOR_DB ?? config.database ?? DEFAULT_EMBEDDED_DATABASE);
}

/** Maps a coordinator refusal to the CLI's exit codes. */
export function controlExit(err: ControlError): CliError {
  if (err.status === 0 || err.status >= 500) return new CliError(err.message, EXIT.internal);
  if (err.status === 409 && (err.code === 'finished' || err.code === 'committed')) return new CliError(err.message, EXIT.notMovable);
  if (err.status === 409) return new CliError(err.message, EXIT.badInput);
  return new CliError(err.message, EXIT.badInput);
}
