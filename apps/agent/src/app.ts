/**
 * The agent's HTTP control API (one agent per host, running as root). app.ts builds the fastify
 * instance; server.ts listens. Every route has a JSON schema; every request but /healthz needs the
 * cluster token. The agent drives the engine only through @tern/native.
 */
import Fastify, { type FastifyInstance } from 'fastify';
import { checkProcess, EngineError, probeKernel } from '@tern/native';
import { createMetrics, type EngineMetrics } from '@tern/metrics';
import { checkRequestSchema, errorSchema } from '@tern/protocol';
import { bearerAuth } from './auth.js';
import type { AgentConfig } from './config.js';

export interface AgentApp {
  app: FastifyInstance;
  metrics: EngineMetrics;
}

export function buildAgentApp(config: AgentConfig, opts: { logger?: boolean } = {}): AgentApp {
  const app = Fastify({
    logger: opts.logger ?? false,
    ajv: { customOptions: { allErrors: false, removeAdditional: false, coerceTypes: false } },
  });
  const metrics = createMetrics({ prefix: 'tern_agent_' });

  app.addHook('onRequest', bearerAuth(config.clusterToken, new Set(['/healthz'])));

  // Schema errors name the offending field: "body/pid must be integer".
  app.setErrorHandler(async (err: Error & { validation?: unknown; statusCode?: number }, _req, reply) => {
    if (err.validation) {
      return reply.code(400).send({ error: 'bad-request', message: err.message });
    }
    if (err instanceof EngineError) {
      return reply.code(422).send({ error: err.operation, message: err.message });
    }
    const code = err.statusCode && err.statusCode >= 400 ? err.statusCode : 500;
    return reply.code(code).send({ error: 'internal', message: err.message });
  });

  app.get('/healthz', { schema: { response: { 200: { type: 'object', properties: { ok: { type: 'boolean' }, name: { type: 'string' } } } } } }, async () => ({
    ok: true,
    name: config.name,
  }));

  app.get('/metrics', async (_req, reply) => {
    reply.header('content-type', metrics.registry.contentType);
    return metrics.registry.metrics();
  });

  app.get('/v1/kernel', async () => probeKernel());

  app.post<{ Body: { pid: number } }>(
    '/v1/check',
    { schema: { body: checkRequestSchema, response: { 400: errorSchema, 401: errorSchema, 422: errorSchema } } },
    async (request) => {
      try {
        const result = await checkProcess(request.body.pid);
        metrics.engineOperationsTotal.inc({ operation: 'check', outcome: result.report.movable ? 'movable' : 'not-movable' });
        return result;
      } catch (err) {
        metrics.engineOperationsTotal.inc({ operation: 'check', outcome: 'error' });
        throw err;
      }
    },
  );

  return { app, metrics };
}
