/**
 * The migration control protocol: what the coordinator sends the agents, what the coordinator's own
 * API accepts, and the progress events it streams. Types and JSON schemas side by side so that
 * fastify validates exactly what TypeScript believes.
 */
import type { CheckReport, FreezeReport, Blocker } from './engine.js';

export const MIGRATION_MODES = ['cold', 'precopy', 'postcopy', 'hybrid'] as const;
export type MigrationMode = (typeof MIGRATION_MODES)[number];
/** Modes this build can actually run; the others are refused with 400. */
export const BUILT_MODES: readonly MigrationMode[] = ['cold', 'precopy', 'postcopy', 'hybrid'];
/** What a migration does when no mode is given: pre-copy rounds, then the last dirty pages lazily. */
export const DEFAULT_MODE: MigrationMode = 'hybrid';
/** Modes whose last pages stay on the source until the destination has pulled them. */
export const LAZY_MODES: readonly MigrationMode[] = ['postcopy', 'hybrid'];

/** The coordinator's state machine. Terminal: done, aborted, failed. */
export const MIGRATION_STATES = ['checking', 'precopy', 'switchover', 'restoring', 'postcopy', 'done', 'aborted', 'failed'] as const;
export type MigrationState = (typeof MIGRATION_STATES)[number];
export const TERMINAL_STATES: readonly MigrationState[] = ['done', 'aborted', 'failed'];
/** The phases a successful migration passes through, in order. */
export const PHASES: readonly MigrationState[] = ['checking', 'precopy', 'switchover', 'restoring', 'postcopy', 'done'];

export function isTerminal(state: MigrationState): boolean {
  return TERMINAL_STATES.includes(state);
}

/** Why a migration did not complete, in a form the CLI maps to exit codes. */
export type FailureKind =
  | 'not-movable' // the source check refused the process (nothing was touched)
  | 'destination-not-ready' // the destination refused (pid taken, files missing, ...)
  | 'bad-input' // no such pid, a kernel thread, ...
  | 'unavailable' // the engine of this build cannot do it yet
  | 'agent-unreachable'
  | 'engine' // the engine failed mid-way (the source was put back)
  | 'aborted' // by request, or by a coordinator restart before the commit point
  | 'internal';

export interface MigrationFailure {
  kind: FailureKind;
  phase: MigrationState;
  message: string;
  blockers?: Blocker[];
}

export interface MigrationStats {
  /** Frozen time: from the freeze at the source to the resume at the destination. */
  downtimeMs: number | null;
  totalMs: number | null;
  bytes: number;
  pages: { data: number; zero: number; dirty: number; lazy: number };
  rounds: number;
  dirtyRateBytesPerSec: number | null;
  restoredPid: number | null;
  /** Post-copy and hybrid: how the memory left on the source came home (null in other modes). */
  homing?: HomingSummary | null;
}

/** How the destination filled the memory it did not have at the resume. */
export interface HomingSummary {
  /** Data pages that were still on the source at the resume. */
  remotePages: number;
  /** Pages copied in answer to a fault (a thread waited for them). */
  faultPages: number;
  /** Pages copied by the background fill. */
  backgroundPages: number;
  faults: number;
  faultP50Ms: number;
  faultP99Ms: number;
  /** Resume → every page home. */
  homeMs: number | null;
  /** Times the pull connection to the source was lost and re-established. */
  reconnects: number;
  /** Bytes pulled from the source. */
  pulledBytes: number;
}

export interface MigrationRecord {
  id: string;
  from: string;
  to: string;
  pid: number;
  mode: MigrationMode;
  maxDowntimeMs: number | null;
  /** MB/s (10^6 bytes per second) as given; null: unlimited. */
  bandwidth: number | null;
  /** Pre-copy: most rounds (null: the default). */
  maxRounds: number | null;
  /** Pre-copy: throttle the process when it dirties faster than the link. */
  autoConverge: boolean;
  /** Post-copy / hybrid: how long the destination retries an unreachable source (null: the default, 30 s). */
  pullGiveUpMs: number | null;
  state: MigrationState;
  /** The commit point has passed: the process lives on the destination from here on. */
  committed: boolean;
  abortRequested: boolean;
  failure: MigrationFailure | null;
  stats: MigrationStats;
  createdAt: string;
  updatedAt: string;
  finishedAt: string | null;
}

export type MigrationEventType = 'phase' | 'progress' | 'log' | 'result';

/** One event of a migration's progress stream (WebSocket, and persisted for replay). */
export interface MigrationEvent {
  migrationId: string;
  /** 1, 2, 3... per migration, in the order they happened. */
  seq: number;
  at: string;
  type: MigrationEventType;
  state: MigrationState;
  message: string;
  progress?: {
    round: number;
    bytes: number;
    dirtyRateBytesPerSec: number | null;
    etaSeconds: number | null;
    /** Pre-copy: pages sent in this round. */
    pages?: number;
    /** Pre-copy: the downtime the switchover would cost now, in ms (dirty bytes ÷ bandwidth + fixed cost). */
    predictedDowntimeMs?: number | null;
    /** Pre-copy: CPU taken from the process by auto-converge, in percent (0: none). */
    throttlePercent?: number;
    /** Post-copy: pages still on the source. */
    pendingPages?: number;
    /** Post-copy: pages home so far, by fault and by the background fill. */
    faultPages?: number;
    backgroundPages?: number;
    /** Post-copy: fault service time so far (ms). */
    faultP50Ms?: number;
    faultP99Ms?: number;
    /** Post-copy: the pull connection to the source. */
    connection?: PullConnectionState;
    reconnects?: number;
  };
  /** On 'result': the final record. */
  record?: MigrationRecord;
}

// ---------------------------------------------------------------- agent API bodies

/** POST /v1/migrations/:id/prepare (destination). */
export interface PrepareRequest {
  pid: number;
  /** The source's kernel release: restore needs the same vdso ABI. */
  kernelRelease?: string;
  residentBytes?: number;
  /** Files the process maps or holds open; they must exist on the destination (same size if given). */
  files?: { path: string; size?: number }[];
  bandwidthBytesPerSec?: number;
}

export interface PageServerAddress {
  address: string;
  port: number;
  migrationId: string;
  /** Per-migration token the page server expects (64 hex chars). */
  token: string;
}

export interface PrepareResponse {
  id: string;
  ready: boolean;
  blockers: Blocker[];
  pageServer: PageServerAddress | null;
}

/** POST /v1/migrations/:id/source. */
export interface SourceRequest {
  pid: number;
  destination: PageServerAddress;
  bandwidthBytesPerSec?: number;
  /** Host names of both ends, for the address-handoff hook's environment. */
  from?: string;
  to?: string;
  /**
   * Post-copy / hybrid: private anonymous memory (post-copy) or its last dirty pages (hybrid) stay
   * in the frozen original and a page source serves them to the destination until commit.
   */
  lazy?: boolean;
}

/** Where the destination pulls the pages a post-copy or hybrid switchover left on the source. */
export interface PageSourceAddress {
  address: string;
  port: number;
  /** Data pages left there. */
  pages: number;
}

export interface SourceResponse {
  id: string;
  /** The process image (msgpack), base64. */
  image: string;
  freeze: FreezeReport;
  /** Milliseconds from the freeze to the end of the dump, measured by the source agent. */
  frozenMs: number;
  dump: Record<string, number>;
  transfer: Record<string, number>;
  /** Service addresses (address/prefix) the source released after the freeze: the destination claims them. */
  addresses: string[];
  /** Post-copy / hybrid: the page source serving what stayed here (null otherwise). */
  pageSource?: PageSourceAddress | null;
}

/** POST /v1/migrations/:id/precopy (source): start dirty tracking; the process keeps running. */
export interface PrecopyStartRequest extends SourceRequest {
  /** Stop the rounds once the predicted downtime is under this. */
  maxDowntimeMs?: number;
  maxRounds?: number;
  /** Throttle the process's CPU (cgroup quota) when it dirties memory faster than it can be sent. */
  autoConverge?: boolean;
  /**
   * What a switchover costs beyond sending the last dirty pages (freeze, image, restore, commit),
   * as the coordinator measured it on earlier migrations; the engine's own estimate otherwise.
   */
  fixedCostMs?: number;
}

export type PrecopyVerdict = 'continue' | 'converged' | 'not-shrinking' | 'round-cap';

/** One pre-copy round, as the source agent measured it. */
export interface PrecopyRound {
  /** 0 = the full first pass; then each round's dirty set. */
  round: number;
  pages: number;
  bytes: number;
  elapsedMs: number;
  /** Time spent finding the dirty pages (PAGEMAP_SCAN or soft-dirty). */
  scanMs: number;
  dirtyRateBytesPerSec: number | null;
  bandwidthBytesPerSec: number | null;
  predictedDowntimeMs: number | null;
}

/** POST /v1/migrations/:id/precopy/round (source): one round while the process runs. */
export interface PrecopyRoundResponse {
  id: string;
  round: PrecopyRound;
  verdict: PrecopyVerdict;
  throttlePercent: number;
}

/** POST /v1/migrations/:id/restore. */
export interface RestoreRequest {
  image: string;
  /** Service addresses to take over before the restore (the restored sockets are bound to them). */
  addresses?: string[];
  /**
   * Let the process run before its private memory is written: userfaultfd serves its faults from
   * the page store and a background fill completes it (the restore's memory write leaves the downtime).
   */
  lazy?: boolean;
  /**
   * Post-copy / hybrid: where the pages the image left on the source are pulled from (with this
   * migration's page credentials). Implies lazy.
   */
  pullFrom?: PullFrom;
  from?: string;
  to?: string;
}

export interface PullFrom {
  address: string;
  port: number;
  /** Background pull cap; faults are never capped. */
  bandwidthBytesPerSec?: number;
  /** How long a lost pull connection is retried before the destination gives up (the copy is killed). */
  giveUpAfterMs?: number;
}

export type PullConnectionState = 'connected' | 'reconnecting' | 'closed' | 'failed';

/** GET /v1/migrations/:id/homing (destination): how the restored process's memory is coming home. */
export interface HomingStatus {
  id: string;
  /** none: nothing was lazy; running; homed: every page here; exited: the process ended first; failed: it was killed (its memory could not be had). */
  state: 'none' | 'running' | 'homed' | 'exited' | 'failed';
  detail: string | null;
  pendingPages: number;
  lazyPages: number;
  faults: number;
  faultPages: number;
  backgroundPages: number;
  zeroPages: number;
  faultP50Ms: number;
  faultP99Ms: number;
  elapsedMs: number;
  homeMs: number | null;
  /** The pull connection to the source (post-copy, hybrid); null when every page was here. */
  remote: {
    state: PullConnectionState;
    reconnects: number;
    disconnectedMs: number;
    faultRequests: number;
    requestP50Ms: number;
    requestP99Ms: number;
    bytes: number;
    lastError: string | null;
  } | null;
}

/**
 * GET /v1/migrations/:id/page-source (source): what the source knows of the post-copy pull. The
 * coordinator asks when it loses the destination mid post-copy: the source alone can tell whether
 * the copy may be running on its own memory (homed: the destination confirmed every page home,
 * the original must never resume) or is certainly dead (never confirmed, and no pull connection
 * for longer than the destination's give-up time: it killed its copy, or its agent died and the
 * copy's guard killed it).
 */
export interface PageSourceStatus {
  id: string;
  /** The source session's state (committed: the original was killed; aborted: it resumed). */
  state: AgentSessionState;
  /** False when this migration left no page source here (cold, pre-copy, or already closed). */
  serving: boolean;
  /** The destination said every page is home and the source acknowledged it. */
  homed: boolean;
  /** Pull connections open now. */
  activeConnections: number;
  /** Milliseconds since the last pull connection closed (or the page source started); null while one is open. */
  idleMs: number | null;
  connections: number;
  pages: number;
  bytes: number;
}

/** How long the destination retries a lost pull connection before it kills its copy, unless the migration says (the engine's default). */
export const DEFAULT_PULL_GIVE_UP_MS = 30_000;

/**
 * Beyond the give-up time, how long the source must have seen no pull connection before the
 * coordinator, which cannot reach the destination, treats the copy as dead and resumes the
 * original: covers the destination noticing the loss later than the source did.
 */
export const LOST_DESTINATION_MARGIN_MS = 5_000;

export type AgentRole = 'source' | 'destination';
export type AgentSessionState =
  | 'prepared' | 'precopy' | 'freezing' | 'dumping' | 'dumped' | 'restoring' | 'restored' | 'committed' | 'aborting' | 'aborted' | 'failed';

export interface AgentMigrationStatus {
  id: string;
  role: AgentRole;
  state: AgentSessionState;
  pid: number;
  restoredPid: number | null;
  error: string | null;
  createdAt: string;
  updatedAt: string;
}

export interface AgentCheckResponse {
  inventory: import('./engine.js').ProcessInventory;
  report: CheckReport;
}

// ---------------------------------------------------------------- JSON schemas

export const migrationIdParamsSchema = {
  type: 'object',
  required: ['id'],
  properties: { id: { type: 'string', pattern: '^[A-Za-z0-9_-]{1,64}$' } },
} as const;

const pidSchema = { type: 'integer', minimum: 1, maximum: 2147483647 } as const;

export const blockerSchema = {
  type: 'object',
  required: ['subject', 'kind', 'reason'],
  properties: { subject: { type: 'string' }, kind: { type: 'string' }, reason: { type: 'string' } },
} as const;

const hostNameSchema = { type: 'string', pattern: '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$' } as const;

export const pageServerAddressSchema = {
  type: 'object',
  required: ['address', 'port', 'migrationId', 'token'],
  additionalProperties: false,
  properties: {
    address: { type: 'string', minLength: 1, maxLength: 255 },
    port: { type: 'integer', minimum: 1, maximum: 65535 },
    migrationId: { type: 'string', minLength: 1, maxLength: 64 },
    token: { type: 'string', pattern: '^[0-9a-f]{64}$' },
  },
} as const;

export const prepareRequestSchema = {
  type: 'object',
  required: ['pid'],
  additionalProperties: false,
  properties: {
    pid: pidSchema,
    kernelRelease: { type: 'string', maxLength: 256 },
    residentBytes: { type: 'integer', minimum: 0 },
    files: {
      type: 'array',
      maxItems: 100000,
      items: {
        type: 'object',
        required: ['path'],
        additionalProperties: false,
        properties: { path: { type: 'string', minLength: 1, maxLength: 4096 }, size: { type: 'integer', minimum: 0 } },
      },
    },
    bandwidthBytesPerSec: { type: 'integer', minimum: 1 },
  },
} as const;

export const prepareResponseSchema = {
  type: 'object',
  required: ['id', 'ready', 'blockers', 'pageServer'],
  properties: {
    id: { type: 'string' },
    ready: { type: 'boolean' },
    blockers: { type: 'array', items: blockerSchema },
    pageServer: { anyOf: [{ type: 'null' }, pageServerAddressSchema] },
  },
} as const;

/** The pre-copy limits, as the coordinator's API and the source agent both take them. */
const maxDowntimeMsSchema = { type: 'integer', minimum: 1, maximum: 3600000 } as const;
const maxRoundsSchema = { type: 'integer', minimum: 1, maximum: 1000 } as const;
/** How long a post-copy destination retries an unreachable source: 100 ms to a day. */
const pullGiveUpMsSchema = { type: 'integer', minimum: 100, maximum: 86400000 } as const;

export const sourceRequestSchema = {
  type: 'object',
  required: ['pid', 'destination'],
  additionalProperties: false,
  properties: {
    pid: pidSchema,
    destination: pageServerAddressSchema,
    bandwidthBytesPerSec: { type: 'integer', minimum: 1 },
    from: hostNameSchema,
    to: hostNameSchema,
    lazy: { type: 'boolean' },
  },
} as const;

/** address/prefix, v4 or v6 (the agent parses it again before use). */
export const serviceAddressSchema = { type: 'string', pattern: '^[0-9A-Fa-f.:]{2,45}(/[0-9]{1,3})?$' } as const;

export const restoreRequestSchema = {
  type: 'object',
  required: ['image'],
  additionalProperties: false,
  properties: {
    // base64 of a msgpack image; 256 MiB is far above any real image (pages are not in it).
    image: { type: 'string', minLength: 1, maxLength: 268435456, pattern: '^[A-Za-z0-9+/]+={0,2}$' },
    addresses: { type: 'array', maxItems: 64, items: serviceAddressSchema },
    lazy: { type: 'boolean' },
    pullFrom: {
      type: 'object',
      required: ['address', 'port'],
      additionalProperties: false,
      properties: {
        address: { type: 'string', minLength: 1, maxLength: 255 },
        port: { type: 'integer', minimum: 1, maximum: 65535 },
        bandwidthBytesPerSec: { type: 'integer', minimum: 1 },
        giveUpAfterMs: pullGiveUpMsSchema,
      },
    },
    from: hostNameSchema,
    to: hostNameSchema,
  },
} as const;

/** ?waitMs=N (0..60000): a query string carries text; the agent parses it after this check. */
export const homingQuerySchema = {
  type: 'object',
  additionalProperties: false,
  properties: { waitMs: { type: 'string', pattern: '^(0|[1-9][0-9]{0,3}|[1-5][0-9]{4}|60000)$' } },
} as const;

export const pageSourceStatusSchema = {
  type: 'object',
  required: ['id', 'state', 'serving', 'homed', 'activeConnections', 'idleMs', 'connections', 'pages', 'bytes'],
  properties: {
    id: { type: 'string' },
    state: { type: 'string' },
    serving: { type: 'boolean' },
    homed: { type: 'boolean' },
    activeConnections: { type: 'integer', minimum: 0 },
    idleMs: { type: ['number', 'null'], minimum: 0 },
    connections: { type: 'integer', minimum: 0 },
    pages: { type: 'integer', minimum: 0 },
    bytes: { type: 'integer', minimum: 0 },
  },
} as const;

export const precopyStartRequestSchema = {
  type: 'object',
  required: ['pid', 'destination'],
  additionalProperties: false,
  properties: {
    ...sourceRequestSchema.properties,
    maxDowntimeMs: maxDowntimeMsSchema,
    maxRounds: maxRoundsSchema,
    autoConverge: { type: 'boolean' },
    fixedCostMs: { type: 'number', minimum: 0, maximum: 600000 },
  },
} as const;

export const agentMigrationStatusSchema = {
  type: 'object',
  required: ['id', 'role', 'state', 'pid'],
  properties: {
    id: { type: 'string' },
    role: { type: 'string', enum: ['source', 'destination'] },
    state: { type: 'string' },
    pid: { type: 'integer' },
    restoredPid: { type: ['integer', 'null'] },
    error: { type: ['string', 'null'] },
    createdAt: { type: 'string' },
    updatedAt: { type: 'string' },
  },
} as const;

// ---------------------------------------------------------------- coordinator API schemas

export interface CreateMigrationRequest {
  from: string;
  to: string;
  pid: number;
  mode?: MigrationMode;
  maxDowntimeMs?: number;
  /** MB/s. */
  bandwidth?: number;
  /** Pre-copy: most rounds before the switchover (default 30). */
  maxRounds?: number;
  /** Pre-copy: throttle the process's CPU if it dirties memory faster than it can be sent (default true). */
  autoConverge?: boolean;
  /** Post-copy / hybrid: how long the destination retries an unreachable source before it gives up (default 30 s). */
  pullGiveUpMs?: number;
}

export const createMigrationRequestSchema = {
  type: 'object',
  required: ['from', 'to', 'pid'],
  additionalProperties: false,
  properties: {
    from: hostNameSchema,
    to: hostNameSchema,
    pid: pidSchema,
    mode: { type: 'string', enum: [...MIGRATION_MODES] },
    maxDowntimeMs: maxDowntimeMsSchema,
    bandwidth: { type: 'number', exclusiveMinimum: 0, maximum: 1000000 },
    maxRounds: maxRoundsSchema,
    autoConverge: { type: 'boolean' },
    pullGiveUpMs: pullGiveUpMsSchema,
  },
} as const;

export const hostParamsSchema = {
  type: 'object',
  required: ['name'],
  properties: { name: hostNameSchema },
} as const;

export interface HostRecord {
  name: string;
  /** Base URL of the host's agent, e.g. http://10.77.0.11:7070. */
  url: string;
}

export const hostBodySchema = {
  type: 'object',
  required: ['url'],
  additionalProperties: false,
  properties: { url: { type: 'string', pattern: '^https?://[^\\s/]+(/.*)?$', maxLength: 2048 } },
} as const;

export const hostSchema = {
  type: 'object',
  required: ['name', 'url'],
  properties: { name: { type: 'string' }, url: { type: 'string' } },
} as const;

const failureSchema = {
  type: ['object', 'null'],
  properties: {
    kind: { type: 'string' },
    phase: { type: 'string' },
    message: { type: 'string' },
    blockers: { type: 'array', items: blockerSchema },
  },
} as const;

export const migrationRecordSchema = {
  type: 'object',
  required: ['id', 'from', 'to', 'pid', 'mode', 'state', 'committed', 'createdAt'],
  properties: {
    id: { type: 'string' },
    from: { type: 'string' },
    to: { type: 'string' },
    pid: { type: 'integer' },
    mode: { type: 'string', enum: [...MIGRATION_MODES] },
    maxDowntimeMs: { type: ['integer', 'null'] },
    bandwidth: { type: ['number', 'null'] },
    maxRounds: { type: ['integer', 'null'] },
    autoConverge: { type: 'boolean' },
    pullGiveUpMs: { type: ['integer', 'null'] },
    state: { type: 'string', enum: [...MIGRATION_STATES] },
    committed: { type: 'boolean' },
    abortRequested: { type: 'boolean' },
    failure: failureSchema,
    stats: {
      type: 'object',
      properties: {
        downtimeMs: { type: ['number', 'null'] },
        totalMs: { type: ['number', 'null'] },
        bytes: { type: 'number' },
        pages: {
          type: 'object',
          properties: { data: { type: 'number' }, zero: { type: 'number' }, dirty: { type: 'number' }, lazy: { type: 'number' } },
        },
        rounds: { type: 'number' },
        dirtyRateBytesPerSec: { type: ['number', 'null'] },
        restoredPid: { type: ['integer', 'null'] },
        homing: {
          type: ['object', 'null'],
          properties: {
            remotePages: { type: 'number' },
            faultPages: { type: 'number' },
            backgroundPages: { type: 'number' },
            faults: { type: 'number' },
            faultP50Ms: { type: 'number' },
            faultP99Ms: { type: 'number' },
            homeMs: { type: ['number', 'null'] },
            reconnects: { type: 'number' },
            pulledBytes: { type: 'number' },
          },
        },
      },
    },
    createdAt: { type: 'string' },
    updatedAt: { type: 'string' },
    finishedAt: { type: ['string', 'null'] },
  },
} as const;
