/**
 * Every Prometheus metric Tern exports, defined once. Base units only (seconds, bytes), counters end
 * in `_total`, and every metric lives in a registry of its own so that several apps (or several test
 * instances of one app) in one process never collide in prom-client's global registry.
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

export type MigrationResult = 'done' | 'aborted' | 'failed';

export interface EngineMetrics {
  registry: Registry;
  /** Time the process was frozen per freeze/thaw cycle done by the engine (checks, dumps). */
  freezeSeconds: Histogram<'role'>;
  /** Engine operations by kind and outcome (inspect, check, freeze, thaw, remote_syscall). */
  engineOperationsTotal: Counter<'operation' | 'outcome'>;
  /** Downtime of a migration, from the freeze of the source to the resume on the destination. */
  downtimeSeconds: Histogram<'mode'>;
  /** Wall time of a whole migration. */
  migrationDurationSeconds: Histogram<'mode'>;
  migrationsTotal: Counter<'mode' | 'result'>;
  /** Bytes of memory moved, by phase (precopy, switchover, postcopy). */
  bytesTotal: Counter<'phase'>;
  /** Pages moved, by kind (data, zero, dirty, lazy). */
  pagesTotal: Counter<'kind'>;
  precopyRoundsTotal: Counter;
  dirtyRateBytesPerSecond: Gauge<'migration'>;
  faultLatencySeconds: Histogram;
  migrationsInProgress: Gauge;
}

/** Builds a fresh registry with every Tern metric; `prefix` defaults to `tern_`. */
export function createMetrics(opts: { prefix?: string; defaultMetrics?: boolean } = {}): EngineMetrics {
  const prefix = opts.prefix ?? 'tern_';
  const registry = new Registry();
  if (opts.defaultMetrics ?? true) collectDefaultMetrics({ register: registry, prefix });
  const registers = [registry];
  return {
    registry,
    freezeSeconds: new Histogram({
      name: `${prefix}freeze_seconds`,
      help: 'Time a process spent frozen under ptrace per freeze/thaw cycle',
      labelNames: ['role'],
      buckets: FREEZE_BUCKETS_SECONDS,
      registers,
    }),
    engineOperationsTotal: new Counter({
      name: `${prefix}engine_operations_total`,
      help: 'Engine operations by kind and outcome',
      labelNames: ['operation', 'outcome'],
      registers,
    }),
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
      buckets: [0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300],
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
    dirtyRateBytesPerSecond: new Gauge({
      name: `${prefix}dirty_rate_bytes_per_second`,
      help: 'Dirty rate measured in the last pre-copy round',
      labelNames: ['migration'],
      registers,
    }),
    faultLatencySeconds: new Histogram({
      name: `${prefix}postcopy_fault_latency_seconds`,
      help: 'Latency of a post-copy page fault, from the fault to UFFDIO_COPY',
      buckets: FAULT_BUCKETS_SECONDS,
      registers,
    }),
    migrationsInProgress: new Gauge({
      name: `${prefix}migrations_in_progress`,
      help: 'Migrations currently between check and done',
      registers,
    }),
  };
}
