/**
 * Migration records, their events and the registered hosts, persisted in embedded SQLite
 * (better-sqlite3, synchronous). The commit point is a row update with synchronous=FULL: once
 * markCommitted() returns, a restart knows the process lives on the destination. One migration per
 * (source host, pid) at a time is a partial unique index, so two racing requests cannot both win.
 */
import Database from 'better-sqlite3';
import { mkdirSync, readFileSync } from 'node:fs';
import { dirname } from 'node:path';
import {
  TERMINAL_STATES,
  type HostRecord,
  type MigrationEvent,
  type MigrationFailure,
  type MigrationMode,
  type MigrationRecord,
  type MigrationState,
  type MigrationStats,
} from '@tern/protocol';

const TERMINAL_SQL = TERMINAL_STATES.map((s) => `'${s}'`).join(', ');

const SCHEMA = `
CREATE TABLE IF NOT EXISTS migrations (
  id              TEXT PRIMARY KEY,
  source_host     TEXT NOT NULL,
  dest_host       TEXT NOT NULL,
  pid             INTEGER NOT NULL,
  mode            TEXT NOT NULL,
  max_downtime_ms INTEGER,
  bandwidth       REAL,
  -- options: {"maxRounds": n, "autoConverge": bool, "pullGiveUpMs": n}
  options         TEXT,
  state           TEXT NOT NULL,
  committed       INTEGER NOT NULL DEFAULT 0,
  abort_requested INTEGER NOT NULL DEFAULT 0,
  failure         TEXT,
  stats           TEXT NOT NULL,
  created_at      TEXT NOT NULL,
  updated_at      TEXT NOT NULL,
  finished_at     TEXT,
  -- the coordinator instance driving it: a restart (or another process over the same file) only
  -- takes over migrations whose owner is gone
  owner_pid       INTEGER NOT NULL DEFAULT 0,
  owner_start     TEXT,
  owner_instance  TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_migration_per_pid
  ON migrations (source_host, pid) WHERE state NOT IN (${TERMINAL_SQL});
CREATE INDEX IF NOT EXISTS migrations_by_creation ON migrations (created_at);
CREATE TABLE IF NOT EXISTS events (
  migration_id TEXT NOT NULL,
  seq          INTEGER NOT NULL,
  body         TEXT NOT NULL,
  PRIMARY KEY (migration_id, seq)
);
CREATE TABLE IF NOT EXISTS hosts (
  name       TEXT PRIMARY KEY,
  url        TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
-- What a pre-copy switchover cost between two hosts beyond moving its last dirty pages (moving
-- average over the migrations done): the next pre-copy's downtime predictions start from it.
CREATE TABLE IF NOT EXISTS switchover_costs (
  source_host TEXT NOT NULL,
  dest_host   TEXT NOT NULL,
  overhead_ms REAL NOT NULL,
  samples     INTEGER NOT NULL,
  updated_at  TEXT NOT NULL,
  PRIMARY KEY (source_host, dest_host)
);
`;

interface MigrationRow {
  id: string;
  source_host: string;
  dest_host: string;
  pid: number;
  mode: string;
  max_downtime_ms: number | null;
  bandwidth: number | null;
  options: string | null;
  state: string;
  committed: number;
  abort_requested: number;
  failure: string | null;
  stats: string;
  created_at: string;
  updated_at: string;
  finished_at: string | null;
  owner_pid: number;
  owner_start: string | null;
  owner_instance: string | null;
}

/** Who drives a migration: this process (pid + start time, against pid reuse) and an instance id within it. */
export interface Owner {
  pid: number;
  start: string | null;
  instance: string;
}

/** /proc/PID/stat starttime, or null if there is no such process (or it is a zombie). */
export function processStartTime(pid: number): string | null {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const rest = s.slice(s.lastIndexOf(')') + 2).split(' ');
    if (rest[0] === 'Z' || rest[0] === 'X') return null;
    return rest[19] ?? null;
  } catch {
    return null;
  }
}

export function emptyStats(): MigrationStats {
  return { downtimeMs: null, totalMs: null, bytes: 0, pages: { data: 0, zero: 0, dirty: 0, lazy: 0 }, rounds: 0, dirtyRateBytesPerSec: null, restoredPid: null };
}

function precopyOptions(text: string | null): { maxRounds: number | null; autoConverge: boolean; pullGiveUpMs: number | null } {
  const o = text ? (JSON.parse(text) as { maxRounds?: number | null; autoConverge?: boolean; pullGiveUpMs?: number | null }) : {};
  return { maxRounds: o.maxRounds ?? null, autoConverge: o.autoConverge ?? true, pullGiveUpMs: o.pullGiveUpMs ?? null };
}

function fromRow(r: MigrationRow): MigrationRecord {
  return {
    id: r.id,
    from: r.source_host,
    to: r.dest_host,
    pid: r.pid,
    mode: r.mode as MigrationMode,
    maxDowntimeMs: r.max_downtime_ms,
    bandwidth: r.bandwidth,
    ...precopyOptions(r.options),
    state: r.state as MigrationState,
    committed: r.committed === 1,
    abortRequested: r.abort_requested === 1,
    failure: r.failure ? (JSON.parse(r.failure) as MigrationFailure) : null,
    stats: { ...emptyStats(), ...(JSON.parse(r.stats) as Partial<MigrationStats>) },
    createdAt: r.created_at,
    updatedAt: r.updated_at,
    finishedAt: r.finished_at,
  };
}

/** A second active migration of the same (host, pid). */
export class ActiveMigrationConflict extends Error {
  override name = 'ActiveMigrationConflict';
}

export class MigrationStore {
  readonly db: Database.Database;

  constructor(readonly file: string) {
    if (file !== ':memory:') mkdirSync(dirname(file), { recursive: true });
    this.db = new Database(file);
    this.db.pragma('journal_mode = WAL');
    // FULL: the commit point must survive a power cut, not only a crash of this process.
    this.db.pragma('synchronous = FULL');
    this.db.pragma('busy_timeout = 5000');
    this.db.exec(SCHEMA);
    // A database made by an earlier version has no options column yet.
    const columns = this.db.prepare(`SELECT name FROM pragma_table_info('migrations')`).all() as { name: string }[];
    if (!columns.some((c) => c.name === 'options')) this.db.exec('ALTER TABLE migrations ADD COLUMN options TEXT');
  }

  close(): void {
    if (this.db.open) this.db.close();
  }

  insert(
    rec: Omit<MigrationRecord, 'createdAt' | 'updatedAt' | 'finishedAt' | 'committed' | 'abortRequested' | 'failure' | 'stats' | 'state' | 'maxRounds' | 'autoConverge' | 'pullGiveUpMs'> &
      Partial<Pick<MigrationRecord, 'maxRounds' | 'autoConverge' | 'pullGiveUpMs'>>,
    owner: Owner,
  ): MigrationRecord {
    const now = new Date().toISOString();
    try {
      this.db
        .prepare(
          `INSERT INTO migrations (id, source_host, dest_host, pid, mode, max_downtime_ms, bandwidth, options, state, stats, created_at, updated_at,
                                   owner_pid, owner_start, owner_instance)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'checking', ?, ?, ?, ?, ?, ?)`,
        )
        .run(
          rec.id, rec.from, rec.to, rec.pid, rec.mode, rec.maxDowntimeMs, rec.bandwidth,
          JSON.stringify({ maxRounds: rec.maxRounds ?? null, autoConverge: rec.autoConverge ?? true, pullGiveUpMs: rec.pullGiveUpMs ?? null }),
          JSON.stringify(emptyStats()), now, now, owner.pid, owner.start, owner.instance,
        );
    } catch (err) {
      if ((err as { code?: string }).code === 'SQLITE_CONSTRAINT_UNIQUE' && /source_host/.test((err as Error).message)) {
        throw new ActiveMigrationConflict(`pid ${rec.pid} on ${rec.from} is already being migrated`);
      }
      throw err;
    }
    return this.get(rec.id)!;
  }

  get(id: string): MigrationRecord | undefined {
    const row = this.db.prepare('SELECT * FROM migrations WHERE id = ?').get(id) as MigrationRow | undefined;
    return row ? fromRow(row) : undefined;
  }

  list(opts: { limit?: number; state?: MigrationState } = {}): MigrationRecord[] {
    const limit = opts.limit ?? 100;
    const rows = (
      opts.state
        ? this.db.prepare('SELECT * FROM migrations WHERE state = ? ORDER BY created_at DESC, rowid DESC LIMIT ?').all(opts.state, limit)
        : this.db.prepare('SELECT * FROM migrations ORDER BY created_at DESC, rowid DESC LIMIT ?').all(limit)
    ) as MigrationRow[];
    return rows.map(fromRow);
  }

  /**
   * Unfinished migrations whose owner is gone (its process dead, or `isLive` says the instance has
   * closed): what a restart must resolve. Each one is taken over by `owner` atomically.
   */
  takeOverOrphans(owner: Owner, isLive: (instance: string) => boolean): MigrationRecord[] {
    const rows = this.db.prepare(`SELECT * FROM migrations WHERE state NOT IN (${TERMINAL_SQL}) ORDER BY created_at`).all() as MigrationRow[];
    const orphans = rows.filter((r) => {
      if (r.owner_instance === owner.instance) return false;
      const alive = r.owner_pid > 0 && processStartTime(r.owner_pid) !== null && processStartTime(r.owner_pid) === r.owner_start;
      if (!alive) return true;
      return r.owner_pid === owner.pid && !isLive(r.owner_instance ?? '');
    });
    const take = this.db.prepare('UPDATE migrations SET owner_pid = ?, owner_start = ?, owner_instance = ? WHERE id = ? AND owner_instance IS ?');
    return orphans.filter((r) => take.run(owner.pid, owner.start, owner.instance, r.id, r.owner_instance).changes === 1).map(fromRow);
  }

  /** An active migration that involves `pid` on `host` (as source or destination). */
  activeFor(host: string, pid: number): MigrationRecord | undefined {
    const row = this.db
      .prepare(`SELECT * FROM migrations WHERE pid = ? AND (source_host = ? OR dest_host = ?) AND state NOT IN (${TERMINAL_SQL}) LIMIT 1`)
      .get(pid, host, host) as MigrationRow | undefined;
    return row ? fromRow(row) : undefined;
  }

  setState(id: string, state: MigrationState): MigrationRecord {
    this.db.prepare('UPDATE migrations SET state = ?, updated_at = ? WHERE id = ?').run(state, new Date().toISOString(), id);
    return this.get(id)!;
  }

  setStats(id: string, stats: MigrationStats): void {
    this.db.prepare('UPDATE migrations SET stats = ?, updated_at = ? WHERE id = ?').run(JSON.stringify(stats), new Date().toISOString(), id);
  }

  requestAbort(id: string): void {
    this.db.prepare('UPDATE migrations SET abort_requested = 1, updated_at = ? WHERE id = ?').run(new Date().toISOString(), id);
  }

  /**
   * The commit point: atomically, only if no abort was requested. Returns false if an abort won.
   * After this returns true the migration can only end 'done'.
   */
  markCommitted(id: string, stats: MigrationStats): boolean {
    const r = this.db
      .prepare('UPDATE migrations SET committed = 1, stats = ?, updated_at = ? WHERE id = ? AND abort_requested = 0 AND committed = 0')
      .run(JSON.stringify(stats), new Date().toISOString(), id);
    return r.changes === 1;
  }

  finish(id: string, state: MigrationState, failure: MigrationFailure | null, stats?: MigrationStats): MigrationRecord {
    const now = new Date().toISOString();
    this.db
      .prepare('UPDATE migrations SET state = ?, failure = ?, stats = COALESCE(?, stats), updated_at = ?, finished_at = ? WHERE id = ?')
      .run(state, failure ? JSON.stringify(failure) : null, stats ? JSON.stringify(stats) : null, now, now, id);
    return this.get(id)!;
  }

  appendEvent(event: MigrationEvent): void {
    this.db.prepare('INSERT INTO events (migration_id, seq, body) VALUES (?, ?, ?)').run(event.migrationId, event.seq, JSON.stringify(event));
  }

  lastSeq(id: string): number {
    const r = this.db.prepare('SELECT MAX(seq) AS seq FROM events WHERE migration_id = ?').get(id) as { seq: number | null };
    return r.seq ?? 0;
  }

  events(id: string, afterSeq = 0): MigrationEvent[] {
    return (this.db.prepare('SELECT body FROM events WHERE migration_id = ? AND seq > ? ORDER BY seq').all(id, afterSeq) as { body: string }[]).map(
      (r) => JSON.parse(r.body) as MigrationEvent,
    );
  }

  hosts(): HostRecord[] {
    return this.db.prepare('SELECT name, url FROM hosts ORDER BY name').all() as HostRecord[];
  }

  host(name: string): HostRecord | undefined {
    return this.db.prepare('SELECT name, url FROM hosts WHERE name = ?').get(name) as HostRecord | undefined;
  }

  /** The learned switchover overhead from `from` to `to` (ms), if a pre-copy measured one. */
  switchoverOverhead(from: string, to: string): number | undefined {
    const row = this.db.prepare('SELECT overhead_ms FROM switchover_costs WHERE source_host = ? AND dest_host = ?').get(from, to) as { overhead_ms: number } | undefined;
    return row?.overhead_ms;
  }

  /** Folds one measured overhead into the moving average (the newest weighs half). */
  recordSwitchoverOverhead(from: string, to: string, overheadMs: number): number {
    const prev = this.switchoverOverhead(from, to);
    const next = prev === undefined ? overheadMs : (prev + overheadMs) / 2;
    this.db
      .prepare(
        `INSERT INTO switchover_costs (source_host, dest_host, overhead_ms, samples, updated_at) VALUES (?, ?, ?, 1, ?)
         ON CONFLICT (source_host, dest_host) DO UPDATE SET overhead_ms = excluded.overhead_ms, samples = samples + 1, updated_at = excluded.updated_at`,
      )
      .run(from, to, next, new Date().toISOString());
    return next;
  }

  putHost(host: HostRecord): { created: boolean } {
    const existed = this.host(host.name) !== undefined;
    this.db
      .prepare('INSERT INTO hosts (name, url, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET url = excluded.url, updated_at = excluded.updated_at')
      .run(host.name, host.url, new Date().toISOString());
    return { created: !existed };
  }
}
