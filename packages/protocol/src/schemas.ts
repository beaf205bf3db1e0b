/** JSON schemas of the HTTP control APIs (fastify validates every request against these). */

export const errorSchema = {
  type: 'object',
  required: ['error', 'message'],
  properties: { error: { type: 'string' }, message: { type: 'string' } },
} as const;

export const checkRequestSchema = {
  type: 'object',
  required: ['pid'],
  additionalProperties: false,
  properties: { pid: { type: 'integer', minimum: 1, maximum: 2147483647 } },
} as const;
