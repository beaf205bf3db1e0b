/**
 * The coordinator's HTTP API. app.ts builds the fastify instance; server.ts listens. Every route has
 * a JSON schema (the OpenAPI document at /openapi.json is generated from them by @fastify/swagger);
 * every request but /healthz and /openapi.json needs the API token.
 *
 *   POST /migrations                 start one {from, to, pid, mode, maxDowntimeMs, bandwidth} → 201
 *   GET  /migrations                 the latest (?limit=, ?state=)
 *   GET  /migrations/:id             one record
 *   POST /migrations/:id/abort       roll back before the commit point (409 after it)
 *   GET  /migrations/:id/events      WebSocket: past events replayed, then live, closed after the result
 *                                    (a plain GET answers the stored events as JSON)
 *   GET  /events                     WebSocket: live events of every migration
 *   GET  /hosts, PUT /hosts/:name    the agents, by host name
 *   GET  /metrics, /healthz, /openapi.json
 */
import Fastify, { type FastifyInstance, type FastifyRequest } from 'fastify';
import swagger from '@fastify/swagger';
import websocket from '@fastify/websocket';
import type { WebSocket } from 'ws';
import { createCoordinatorMetrics } from '@tern/metrics';
import {
  MIGRATION_MODES,
  bearerAuth,
  createMigrationRequestSchema,
  errorSchema,
  hostBodySchema,
  hostParamsSchema,
  hostSchema,
  isTerminal,
  MIGRATION_STATES,
  migrationIdParamsSchema,
  migrationRecordSchema,
  type CreateMigrationRequest,
  type MigrationEvent,
  type MigrationState,
} from '@tern/protocol';

import type { CoordinatorConfig } from './config.js';
import { Coordinator, CoordinatorError, type CoordinatorOptions } from './coordinator.js';
import { MigrationStore } from './store.js';

export interface CoordinatorApp {
  app: FastifyInstance;
  coordinator: Coordinator;
}

export interface CoordinatorAppOptions {
  logger?: boolean;
  /** How long startup waits for interrupted migrations to resolve before serving (they go on after). */
  recoveryWaitMs?: number;
  /** Passed through to the Coordinator (timeouts, retry delays). */
  coordinator?: Partial<Omit<CoordinatorOptions, 'store' | 'clusterToken'>>;
}

const errors = { 400: errorSchema, 401: errorSchema, 404: errorSchema, 409: errorSchema, 500: errorSchema, 503: errorSchema };
const eventsDescription = 'WebSocket (ws://): every event of the migration as JSON text frames, past ones first; closed after the result. A plain GET returns them as a JSON array.';

export function buildCoordinatorApp(config: CoordinatorConfig, opts: CoordinatorAppOptions = {}): CoordinatorApp {
  const app = Fastify({
    logger: opts.logger ?? false,
    ajv: { customOptions: { allErrors: false, removeAdditional: false, coerceTypes: false } },
  });
  const store = new MigrationStore(config.database);
  for (const h of config.hosts) store.putHost(h);
  const coordinator = new Coordinator({
    store,
    clusterToken: config.clusterToken,
    metrics: createCoordinatorMetrics({ modes: MIGRATION_MODES }),
    ...(opts.logger && { log: (m: string) => app.log.info(m) }),
    ...opts.coordinator,
  });

  app.addHook('onReady', async () => {
    const recovery = coordinator.recover();
    recovery.catch((err: unknown) => app.log.error(err));
    await Promise.race([recovery, new Promise((r) => setTimeout(r, opts.recoveryWaitMs ?? 10_000).unref())]);
  });
  app.addHook('onClose', async () => {
    coordinator.close();
    await Promise.race([coordinator.idle(), new Promise((r) => setTimeout(r, 2000).unref())]);
    store.close();
  });

  app.setErrorHandler(async (err: Error & { validation?: unknown; statusCode?: number }, request, reply) => {
    if (err.validation) return reply.code(400).send({ error: 'bad-request', message: err.message });
    if (err instanceof CoordinatorError) return reply.code(err.statusCode).send({ error: err.code, message: err.message });
    request.log.error(err);
    const code = err.statusCode && err.statusCode >= 400 ? err.statusCode : 500;
    return reply.code(code).send({ error: 'internal', message: err.message });
  });

  void app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: { title: 'Tern coordinator', version: '0.1.0', description: 'Live migration of running Linux processes between hosts' },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
      security: [{ bearer: [] }],
    },
  });
  void app.register(websocket);
  // Routes in a plugin registered after swagger, so its onRoute hook sees every one of them.
  void app.register(async (api) => {
    // Here, after @fastify/websocket's own onRequest hook: a 401 to an upgrade request must find it
    // marked as one, or the raw socket is never released and close() waits forever.
    api.addHook('onRequest', bearerAuth(config.apiToken, new Set(['/healthz', '/openapi.json'])));
    await routes(api, coordinator);
  });
  return { app, coordinator };
}

async function routes(app: FastifyInstance, coordinator: Coordinator): Promise<void> {
  app.get('/healthz', { schema: { hide: true } }, async () => ({ ok: true }));
  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger());

  app.get('/metrics', { schema: { summary: 'Prometheus metrics', produces: ['text/plain'] } }, async (_req, reply) => {
    reply.header('content-type', coordinator.metrics.registry.contentType);
    return coordinator.metrics.registry.metrics();
  });

  app.get(
    '/hosts',
    { schema: { summary: 'Registered hosts and their agents', response: { 200: { type: 'object', properties: { hosts: { type: 'array', items: hostSchema } } }, 401: errorSchema } } },
    async () => ({ hosts: coordinator.hosts() }),
  );

  app.put<{ Params: { name: string }; Body: { url: string } }>(
    '/hosts/:name',
    { schema: { summary: 'Register (or move) a host', params: hostParamsSchema, body: hostBodySchema, response: { 200: hostSchema, 201: hostSchema, ...errors } } },
    async (request, reply) => {
      const { host, created } = coordinator.putHost(request.params.name, request.body.url);
      return reply.code(created ? 201 : 200).send(host);
    },
  );

  app.post<{ Body: CreateMigrationRequest }>(
    '/migrations',
    {
      schema: {
        summary: 'Start a migration (only mode cold is built in this version)',
        body: createMigrationRequestSchema,
        response: { 201: migrationRecordSchema, ...errors },
      },
    },
    async (request, reply) => reply.code(201).send(coordinator.create(request.body)),
  );

  app.get<{ Querystring: { limit?: string; state?: MigrationState } }>(
    '/migrations',
    {
      schema: {
        summary: 'The latest migrations, newest first',
        querystring: {
          type: 'object',
          additionalProperties: false,
          properties: { limit: { type: 'string', pattern: '^[0-9]{1,4}$' }, state: { type: 'string', enum: [...MIGRATION_STATES] } },
        },
        response: { 200: { type: 'object', properties: { migrations: { type: 'array', items: migrationRecordSchema } } }, ...errors },
      },
    },
    async (request) => ({
      migrations: coordinator.list({
        limit: Math.max(1, Math.min(1000, Number(request.query.limit ?? 100))),
        ...(request.query.state !== undefined && { state: request.query.state }),
      }),
    }),
  );

  app.get<{ Params: { id: string } }>(
    '/migrations/:id',
    { schema: { summary: 'One migration', params: migrationIdParamsSchema, response: { 200: migrationRecordSchema, ...errors } } },
    async (request) => coordinator.get(request.params.id),
  );

  app.post<{ Params: { id: string } }>(
    '/migrations/:id/abort',
    {
      schema: {
        summary: 'Abort before the commit point: the process stays (or is put back) on the source',
        params: migrationIdParamsSchema,
        response: { 200: migrationRecordSchema, ...errors },
      },
    },
    async (request) => coordinator.abort(request.params.id),
  );

  app.route<{ Params: { id: string } }>({
    method: 'GET',
    url: '/migrations/:id/events',
    schema: { summary: 'Progress events of one migration', description: eventsDescription, params: migrationIdParamsSchema, response: { 401: errorSchema, 404: errorSchema } },
    // Unknown ids are refused before the upgrade, with a plain 404.
    preValidation: async (request: FastifyRequest<{ Params: { id: string } }>) => {
      coordinator.get(request.params.id);
    },
    handler: async (request) => coordinator.events(request.params.id),
    wsHandler: (socket: WebSocket, request: FastifyRequest<{ Params: { id: string } }>) => streamMigration(coordinator, request.params.id, socket),
  });

  app.route({
    method: 'GET',
    url: '/events',
    schema: { summary: 'Progress events of every migration, live', description: 'WebSocket: every new event of every migration as JSON text frames.' },
    handler: async (_request, reply) => reply.code(400).send({ error: 'bad-request', message: '/events is a WebSocket: connect with ws://' }),
    wsHandler: (socket: WebSocket) => {
      const off = coordinator.subscribe(null, (e) => socket.send(JSON.stringify(e)));
      socket.on('close', off);
      socket.on('error', off);
    },
  });
}

/** Replays the stored events of a migration, then streams the live ones, in seq order, no gaps or repeats. */
function streamMigration(coordinator: Coordinator, id: string, socket: WebSocket): void {
  let lastSeq = 0;
  let replaying = true;
  const queued: MigrationEvent[] = [];
  const send = (e: MigrationEvent) => {
    if (e.seq <= lastSeq) return;
    lastSeq = e.seq;
    socket.send(JSON.stringify(e));
    if (e.type === 'result') socket.close(1000, 'migration finished');
  };
  // Subscribe before reading the store: an event emitted in between is queued, not lost.
  const off = coordinator.subscribe(id, (e) => (replaying ? queued.push(e) : send(e)));
  socket.on('close', off);
  socket.on('error', off);
  for (const e of coordinator.events(id)) send(e);
  replaying = false;
  for (const e of queued) send(e);
  // A migration that finished before we subscribed (and whose result we replayed) is closed by send();
  // one resolved without a result event (never) would still be closed here.
  if (isTerminal(coordinator.get(id).state) && socket.readyState === socket.OPEN && lastSeq === 0) socket.close(1000, 'migration finished');
}
