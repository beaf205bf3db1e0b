/**
 * Bearer-token authentication (the same scheme as the agents'): every API request carries
 * `Authorization: Bearer <token>`, compared in constant time; anything else gets 401 with a body that
 * says what was wrong. WebSocket upgrades go through it too.
 */
import { timingSafeEqual, createHash } from 'node:crypto';
import type { FastifyReply, FastifyRequest } from 'fastify';

function digest(s: string): Buffer {
  // Hash both sides so timingSafeEqual always compares equal lengths.
  return createHash('sha256').update(s).digest();
}

export function bearerAuth(token: string, publicPaths: ReadonlySet<string>) {
  const expected = digest(token);
  return async function authenticate(request: FastifyRequest, reply: FastifyReply): Promise<void> {
    if (publicPaths.has(request.routeOptions.url ?? '')) return;
    const header = request.headers.authorization;
    if (!header) {
      await reply.code(401).send({ error: 'unauthorized', message: 'missing Authorization: Bearer <cluster token>' });
      return;
    }
    const match = /^Bearer ([^\s]+)$/.exec(header);
    if (!match?.[1]) {
      await reply.code(401).send({ error: 'unauthorized', message: 'Authorization header is not of the form Bearer <token>' });
      return;
    }
    if (!timingSafeEqual(digest(match[1]), expected)) {
      await reply.code(401).send({ error: 'unauthorized', message: 'wrong cluster token' });
    }
  };
}
