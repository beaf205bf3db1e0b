/**
 * The control APIs' authentication scheme, shared by agents and coordinator: every request carries
 * `Authorization: Bearer <token>`, compared in constant time; anything else gets 401 with a body
 * that says what was wrong. WebSocket upgrades go through it too. Written against the few request
 * and reply members it uses, so that this package needs no web framework (fastify's objects fit).
 */
import { createHash, timingSafeEqual } from 'node:crypto';

interface AuthRequest {
  headers: { authorization?: string | undefined };
  routeOptions: { url?: string | undefined };
}

interface AuthReply {
  code(statusCode: number): { send(body: unknown): unknown };
}

function digest(s: string): Buffer {
  // Hash both sides so timingSafeEqual always compares equal lengths.
  return createHash('sha256').update(s).digest();
}

/** An onRequest hook: requests to `publicPaths` (route patterns) pass without a token. */
export function bearerAuth(token: string, publicPaths: ReadonlySet<string>) {
  const expected = digest(token);
  return async function authenticate(request: AuthRequest, reply: AuthReply): Promise<void> {
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
