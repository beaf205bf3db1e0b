/**
 * The wire codec shared by coordinator, agents and CLI: msgpack (msgpackr) with a small versioned
 * envelope `{ v, type, body }`. Everything decoded is validated before use: a frame that is not a
 * map, has another protocol version, an unknown type or a body that is not an object is refused with
 * a ProtocolError that says which of these it was.
 */
import { Packr } from 'msgpackr';

export const PROTOCOL_VERSION = 1;

export class ProtocolError extends Error {
  override name = 'ProtocolError';
}

export interface Envelope<T extends string = string, B = unknown> {
  v: number;
  type: T;
  body: B;
}

// Plain maps (no records extension): the same bytes are readable by Rust's rmp-serde.
const packr = new Packr({ useRecords: false, mapsAsObjects: true, int64AsType: 'number' });

export function encode<T extends string, B>(type: T, body: B): Buffer {
  return packr.pack({ v: PROTOCOL_VERSION, type, body } satisfies Envelope<T, B>);
}

/** Decodes one envelope; `types` lists the message types the caller accepts. */
export function decode<T extends string>(bytes: Uint8Array, types: readonly T[]): Envelope<T, Record<string, unknown>> {
  let value: unknown;
  try {
    value = packr.unpack(bytes);
  } catch (err) {
    throw new ProtocolError(`malformed frame: ${(err as Error).message}`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new ProtocolError('malformed frame: not a map');
  }
  const env = value as Partial<Envelope>;
  if (env.v !== PROTOCOL_VERSION) {
    throw new ProtocolError(`protocol version ${String(env.v)} is not supported (this side speaks ${PROTOCOL_VERSION})`);
  }
  if (typeof env.type !== 'string' || !(types as readonly string[]).includes(env.type)) {
    throw new ProtocolError(`unexpected message type ${JSON.stringify(env.type)}`);
  }
  if (typeof env.body !== 'object' || env.body === null || Array.isArray(env.body)) {
    throw new ProtocolError(`message ${env.type}: body is not a map`);
  }
  return env as Envelope<T, Record<string, unknown>>;
}
