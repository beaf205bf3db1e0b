/**
 * Every Prometheus metric Tern exports, defined once. Base units only (seconds, bytes), counters end
 * in `_total`, and every metric lives in a registry of its own so that several apps (or several test
 * instances of one app) in one process never collide in prom-client's global registry.
 *
 * Two sets: the agent's (prefix `tern_agent_`: what one host's engine did) and the coordinator's
 * (prefix `tern_`: what whole migrations did). The dashboard and rules in deploy/prometheus and
 * deploy/grafana query these names.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/** Buckets from 1 ms to 10 s: the range a switchover downtime can plausibly take. */
export const DOWNTIME_BUCKETS_SECONDS = [
  0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10,
];

/** Buckets for a single ptrace freeze or thaw of a process: 50 µs to 1 s. */
export const FREEZE_BUCKETS_SECONDS = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1,
];

/** Buckets for a post-copy page fault served over the network: 10 µs to 100 ms. */
export const FAULT_BUCKETS_SECONDS = [
  0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1,
];

/** Whole-migration wall time: 100 ms to 10 min. */
export const DURATION_BUCKETS_SECONDS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600];

/** Bytes moved by one migration: 1 MiB to 64 GiB in powers of 4. */
export const MIGRATION_BYTES_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536].map((mib) => mib * 1024 * 1024);

/** Pre-copy rounds of one migration (cold migrations land in the 0 bucket). */
export const ROUNDS_BUCKETS = [0, 1, 2, 3, 5, 8, 13, 20, 30];

export type MigrationResult = 'done' | 'aborted' | 'failed';
export const MIGRATION_RESULTS: readonly MigrationResult[] = ['done', 'aborted', 'failed'];
/** Phases whose bytes are counted separately. */
export const BYTE_PHASES = ['precopy', 'switchover', 'postcopy'] as const;
/** What the source decided about a destination lost mid post-copy. */
export const LOST_DESTINATION_OUTCOMES = ['finished', 'rolled-back'] as const;
export const PAGE_KINDS = ['data', 'zero', 'dirty', 'lazy', 'fault', 'background'] as const;

function registryWithDefaults(prefix: string, defaultMetrics: boolean): Registry {
  const registry = new Registry();
  if (defaultMetrics) collectDefaultMetrics({ register: registry, prefix });
  return registry;
}

// ---------------------------------------------------------------- agent

export interface AgentMetrics {
  registry: Registry;
  /** Time the process was frozen per freeze/thaw cycle done by the engine (dumps, aborts). */
  freezeSeconds: Histogram<'role'>;
  /** Engine operations by kind and outcome (check, prepare, dump, restore, commit, abort). */
  engineOperationsTotal: Counter<'operation' | 'outcome'>;
  /** Migration roles this agent played to their end, by role and outcome. */
  migrationRolesTotal: Counter<'role' | 'outcome'>;
  /** Migrations this agent holds state for (a page server, a frozen source, a restored process). */
  activeSessions: Gauge<'role'>;
  /** Bytes of pages this agent's engine sent (source) or received (destination). */
  pageBytesTotal: Counter<'direction'>;
  /** Pages moved by this agent's engine, by kind (data, zero, dirty, lazy). */
  pagesTotal: Counter<'kind'>;
  /** Time to rebuild a process on this host. */
  restoreSeconds: Histogram;
  /** Latency of a post-copy page fault served on this host, from the fault to UFFDIO_COPY. */
  faultLatencySeconds: Histogram;
  /**
   * Per restored TCP connection: from the process resuming here until the peer's first data
   * arrives. A client's pause is the downtime plus this.
   */
  tcpResumeDelaySeconds: Histogram;
  /** Restored TCP connections whose peer sent nothing within the watch after the restore. */
  tcpIdleConnectionsTotal: Counter;
  /** After a lazy restore: from the process resuming until every page of its memory is home. */
  lazyHomeSeconds: Histogram;
  /** Lazily restored pages that came home, by how: on a fault (a thread waited) or in the background fill. */
  lazyPagesTotal: Counter<'how'>;
  /** Pages of lazily restored processes on this host still to come home. */
  lazyPendingPages: Gauge;
  /** Post-copy pull connections to a source host that were lost and re-established. */
  pullReconnectsTotal: Counter;
  /** Lazily restored processes whose pull connection to the source is down right now (their faults wait). */
  pullDisconnected: Gauge;
  /** Control requests answered 4xx/5xx, by route and status code (401s included). */
  requestErrorsTotal: Counter<'route' | 'code'>;
}

/** The agent's registry; `prefix` defaults to `tern_agent_`. */
export function createAgentMetrics(opts: { prefix?: string; defaultMetrics?: boolean } = {}): AgentMetrics {
  const prefix = opts.prefix ?? 'tern_agent_';
  const registry = registryWithDefaults(prefix, opts.defaultMetrics ?? true);
  const registers = [registry];
  const m: AgentMetrics = {
    registry,
    freezeSeconds: new Histogram({
      name: `${prefix}freeze_seconds`,
      help: 'Time a process spent frozen under ptrace per freeze/thaw or freeze/commit cycle',
      labelNames: ['role'],
      buckets: FREEZE_BUCKETS_SECONDS.concat([2.5, 10]),
      registers,
    }),
    engineOperationsTotal: new Counter({
      name: `${prefix}engine_operations_total`,
      help: 'Engine operations by kind and outcome',
      labelNames: ['operation', 'outcome'],
      registers,
    }),
    migrationRolesTotal: new Counter({
      name: `${prefix}migration_roles_total`,
      help: 'Source or destination roles this agent played, by outcome (committed, aborted, failed)',
      labelNames: ['role', 'outcome'],
      registers,
    }),
    activeSessions: new Gauge({
      name: `${prefix}active_migrations`,
      help: 'Migrations this agent currently holds state for, by role',
      labelNames: ['role'],
      registers,
    }),
    pageBytesTotal: new Counter({
      name: `${prefix}page_bytes_total`,
      help: 'Bytes of pages sent (source) or received (destination) by this agent',
      labelNames: ['direction'],
      registers,
    }),
    pagesTotal: new Counter({
      name: `${prefix}pages_total`,
      help: 'Pages moved by this agent, by kind (data, zero, dirty, lazy)',
      labelNames: ['kind'],
      registers,
    }),
    restoreSeconds: new Histogram({
      name: `${prefix}restore_seconds`,
      help: 'Time to rebuild a process on this host',
      buckets: DOWNTIME_BUCKETS_SECONDS,
      registers,
    }),
    faultLatencySeconds: new Histogram({
      name: `${prefix}postcopy_fault_latency_seconds`,
      help: 'Latency of a post-copy page fault served on this host, from the fault to UFFDIO_COPY',
      buckets: FAULT_BUCKETS_SECONDS,
      registers,
    }),
    tcpResumeDelaySeconds: new Histogram({
      name: `${prefix}tcp_resume_delay_seconds`,
      help: 'Per restored TCP connection: time from the process resuming on this host until the first data from its peer (a client pause is the downtime plus this)',
      buckets: DOWNTIME_BUCKETS_SECONDS,
      registers,
    }),
    lazyHomeSeconds: new Histogram({
      name: `${prefix}lazy_home_seconds`,
      help: 'After a lazy restore: time from the process resuming until every page of its memory is home',
      buckets: DOWNTIME_BUCKETS_SECONDS,
      registers,
    }),
    lazyPagesTotal: new Counter({
      name: `${prefix}lazy_pages_total`,
      help: 'Lazily restored pages that came home, by how (fault: a thread waited for it; background: the fill)',
      labelNames: ['how'],
      registers,
    }),
    lazyPendingPages: new Gauge({
      name: `${prefix}lazy_pending_pages`,
      help: 'Pages of lazily restored processes on this host still to come home',
      registers,
    }),
    pullReconnectsTotal: new Counter({
      name: `${prefix}pull_reconnects_total`,
      help: 'Post-copy pull connections to a source host that were lost and re-established',
      registers,
    }),
    pullDisconnected: new Gauge({
      name: `${prefix}pull_disconnected`,
      help: 'Lazily restored processes whose pull connection to the source is down right now (their faults wait)',
      registers,
    }),
    tcpIdleConnectionsTotal: new Counter({
      name: `${prefix}tcp_idle_connections_total`,
      help: 'Restored TCP connections whose peer sent no data within 5 s after the restore',
      registers,
    }),
    requestErrorsTotal: new Counter({
      name: `${prefix}request_errors_total`,
      help: 'Control requests answered with an error status, by route and code',
      labelNames: ['route', 'code'],
      registers,
    }),
  };
  // Series exist from the start, so rate() and the dashboard have something before the first migration.
  for (const role of ['source', 'destination']) {
    m.activeSessions.set({ role }, 0);
    for (const outcome of ['committed', 'aborted', 'failed']) m.migrationRolesTotal.inc({ role, outcome }, 0);
  }
  m.freezeSeconds.zero({ role: 'source' });
  for (const direction of ['sent', 'received']) m.pageBytesTotal.inc({ direction }, 0);
  for (const kind of PAGE_KINDS) m.pagesTotal.inc({ kind }, 0);
  for (const how of ['fault', 'background']) m.lazyPagesTotal.inc({ how }, 0);
  return m;
}

// ---------------------------------------------------------------- coordinator

export interface CoordinatorMetrics {
  registry: Registry;
  /** Downtime of a migration, from the freeze of the source to the resume on the destination. */
  downtimeSeconds: Histogram<'mode'>;
  /** Wall time of a whole migration, check to done. */
  migrationDurationSeconds: Histogram<'mode'>;
  /** Time spent in each phase of the state machine. */
  phaseDurationSeconds: Histogram<'phase'>;
  migrationsTotal: Counter<'mode' | 'result'>;
  /** Bytes of memory moved, by phase (precopy, switchover, postcopy). */
  bytesTotal: Counter<'phase'>;
  /** Bytes moved by one migration. */
  migrationBytes: Histogram<'mode'>;
  /** Pages moved, by kind (data, zero, dirty, lazy). */
  pagesTotal: Counter<'kind'>;
  precopyRoundsTotal: Counter;
  /** Pre-copy rounds of one migration. */
  migrationRounds: Histogram<'mode'>;
  /** Dirty rate measured in the last pre-copy round of the migration running now (0 when none). */
  dirtyRateBytesPerSecond: Gauge;
  /** Downtime the switchover would cost after the last pre-copy round (0 when none runs). */
  predictedDowntimeSeconds: Gauge;
  /** Share of its CPU taken from the process by auto-converge in the migration running now (0..1). */
  throttleRatio: Gauge;
  /** Post-copy and hybrid: from the resume until every page left on the source is home. */
  homeSeconds: Histogram<'mode'>;
  /** Post-copy and hybrid: pull connections lost and re-established during homing. */
  pullReconnectsTotal: Counter;
  /**
   * Post-copy and hybrid: the destination could not be asked and the source decided, by outcome:
   * finished (it had heard every page home) or rolled-back (never heard it, silent past give-up).
   */
  lostDestinationTotal: Counter<'outcome'>;
  migrationsInProgress: Gauge;
  /** Calls to agents that failed (unreachable, 5xx), by host. */
  agentErrorsTotal: Counter<'host'>;
  /** Interrupted migrations a restart resolved, by the state they were resolved to. */
  recoveriesTotal: Counter<'result'>;
}

/** The coordinator's registry; `prefix` defaults to `tern_`. */
export function createCoordinatorMetrics(opts: { prefix?: string; defaultMetrics?: boolean; modes?: readonly string[] } = {}): CoordinatorMetrics {
  const prefix = opts.prefix ?? 'tern_';
  const registry = registryWithDefaults(prefix, opts.defaultMetrics ?? true);
  const registers = [registry];
  const m: CoordinatorMetrics = {
    registry,
    downtimeSeconds: new Histogram({
      name: `${prefix}migration_downtime_seconds`,
      help: 'Downtime of a migration: from the freeze at the source to the resume at the destination',
      labelNames: ['mode'],
      buckets: DOWNTIME_BUCKETS_SECONDS,
      registers,
    }),
    migrationDurationSeconds: new Histogram({
      name: `${prefix}migration_duration_seconds`,
      help: 'Wall time of a whole migration, check to done',
      labelNames: ['mode'],
      buckets: DURATION_BUCKETS_SECONDS,
      registers,
    }),
    phaseDurationSeconds: new Histogram({
      name: `${prefix}migration_phase_duration_seconds`,
      help: 'Time a migration spent in each phase of the state machine',
      labelNames: ['phase'],
      buckets: [0.001, 0.005, 0.01, 0.05, ...DURATION_BUCKETS_SECONDS],
      registers,
    }),
    migrationsTotal: new Counter({
      name: `${prefix}migrations_total`,
      help: 'Migrations finished, by mode and result',
      labelNames: ['mode', 'result'],
      registers,
    }),
    bytesTotal: new Counter({
      name: `${prefix}migration_bytes_total`,
      help: 'Bytes of process memory moved, by phase',
      labelNames: ['phase'],
      registers,
    }),
    migrationBytes: new Histogram({
      name: `${prefix}migration_transferred_bytes`,
      help: 'Bytes of process memory moved by one migration',
      labelNames: ['mode'],
      buckets: MIGRATION_BYTES_BUCKETS,
      registers,
    }),
    pagesTotal: new Counter({
      name: `${prefix}migration_pages_total`,
      help: 'Pages moved, by kind (data, zero, dirty, lazy)',
      labelNames: ['kind'],
      registers,
    }),
    precopyRoundsTotal: new Counter({
      name: `${prefix}precopy_rounds_total`,
      help: 'Pre-copy rounds run',
      registers,
    }),
    migrationRounds: new Histogram({
      name: `${prefix}migration_rounds`,
      help: 'Pre-copy rounds of one migration',
      labelNames: ['mode'],
      buckets: ROUNDS_BUCKETS,
      registers,
    }),
    dirtyRateBytesPerSecond: new Gauge({
      name: `${prefix}dirty_rate_bytes_per_second`,
      help: 'Dirty rate measured in the last pre-copy round of the migration in progress',
      registers,
    }),
    predictedDowntimeSeconds: new Gauge({
      name: `${prefix}precopy_predicted_downtime_seconds`,
      help: 'Downtime the switchover would cost after the last pre-copy round of the migration in progress',
      registers,
    }),
    throttleRatio: new Gauge({
      name: `${prefix}precopy_throttle_ratio`,
      help: 'Share of its CPU taken from the process by auto-converge in the migration in progress (0..1)',
      registers,
    }),
    homeSeconds: new Histogram({
      name: `${prefix}postcopy_home_seconds`,
      help: 'Post-copy and hybrid: time from the resume until every page left on the source is home',
      labelNames: ['mode'],
      buckets: DURATION_BUCKETS_SECONDS,
      registers,
    }),
    pullReconnectsTotal: new Counter({
      name: `${prefix}postcopy_reconnects_total`,
      help: 'Post-copy and hybrid: pull connections to the source lost and re-established during homing',
      registers,
    }),
    lostDestinationTotal: new Counter({
      name: `${prefix}postcopy_lost_destination_total`,
      help: 'Post-copy and hybrid: destinations lost during homing, by what the source decided (finished: every page was home; rolled-back: the copy was dead, the original resumed)',
      labelNames: ['outcome'],
      registers,
    }),
    migrationsInProgress: new Gauge({
      name: `${prefix}migrations_in_progress`,
      help: 'Migrations currently between check and a final state',
      registers,
    }),
    agentErrorsTotal: new Counter({
      name: `${prefix}agent_errors_total`,
      help: 'Calls from the coordinator to an agent that failed (unreachable or 5xx), by host',
      labelNames: ['host'],
      registers,
    }),
    recoveriesTotal: new Counter({
      name: `${prefix}recoveries_total`,
      help: 'Migrations interrupted by a coordinator restart, by the state the restart resolved them to',
      labelNames: ['result'],
      registers,
    }),
  };
  for (const mode of opts.modes ?? ['cold']) {
    m.downtimeSeconds.zero({ mode });
    m.migrationDurationSeconds.zero({ mode });
    m.migrationBytes.zero({ mode });
    m.migrationRounds.zero({ mode });
    for (const result of MIGRATION_RESULTS) m.migrationsTotal.inc({ mode, result }, 0);
  }
  for (const phase of BYTE_PHASES) m.bytesTotal.inc({ phase }, 0);
  for (const kind of PAGE_KINDS) m.pagesTotal.inc({ kind }, 0);
  for (const result of MIGRATION_RESULTS) m.recoveriesTotal.inc({ result }, 0);
  for (const outcome of LOST_DESTINATION_OUTCOMES) m.lostDestinationTotal.inc({ outcome }, 0);
  return m;
}
