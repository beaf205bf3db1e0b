/**
 * `migrate image show FILE [--json]`: a process image (msgpack, written by the engine's image model
 * in crates/tern-core/src/image) printed readably, in the manner of CRIU's crit. Generic on purpose:
 * whatever maps and arrays the image holds are shown as a tree, so the printer never lags the model.
 * Byte strings are shown as their length and first bytes, integers beyond 2^32 also in hex.
 */
import { readFileSync, statSync } from 'node:fs';
import { Unpackr } from 'msgpackr';
import { CliError, EXIT } from '../exit-codes.js';
import { formatBytes } from '../render.js';
import { parse } from './migrate.js';

// 'auto': integers that fit a double stay numbers, larger u64 (addresses, masks) become BigInt.
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true, int64AsType: 'auto' as 'bigint' });

/** One msgpack map or array filling the whole buffer; anything else is not an image. */
export function decodeImage(bytes: Uint8Array): unknown {
  const values = unpackr.unpackMultiple(bytes) as unknown[];
  if (values.length !== 1) throw new Error(`${values.length} top-level values, an image has one`);
  const v = values[0];
  if (typeof v !== 'object' || v === null || v instanceof Uint8Array) throw new Error(`the top level is ${v === null ? 'nil' : typeof v}, not a map or array`);
  return v;
}

/** JSON-safe form: BigInt → "0x…", bytes → { bytes: n, hex: "…" }. */
export function toJsonValue(v: unknown): unknown {
  if (typeof v === 'bigint') return `0x${v.toString(16)}`;
  if (v instanceof Uint8Array) return { bytes: v.length, hex: Buffer.from(v).toString('hex') };
  if (Array.isArray(v)) return v.map(toJsonValue);
  if (v instanceof Map) return Object.fromEntries([...v.entries()].map(([k, x]) => [String(k), toJsonValue(x)]));
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, toJsonValue(x)]));
  return v;
}

function scalar(v: unknown): string | null {
  if (v === null || v === undefined) return 'null';
  if (typeof v === 'bigint') return `0x${v.toString(16)}`;
  if (typeof v === 'number') return Number.isInteger(v) && v > 0xffffffff ? `0x${v.toString(16)} (${v})` : String(v);
  if (typeof v === 'string') return /^[\x20-\x7e]*$/.test(v) && v !== '' ? v : JSON.stringify(v);
  if (typeof v === 'boolean') return String(v);
  if (v instanceof Uint8Array) {
    const head = Buffer.from(v.subarray(0, 16)).toString('hex').replace(/(..)/g, '$1 ').trim();
    return `<${v.length} bytes${v.length ? `: ${head}${v.length > 16 ? ' …' : ''}` : ''}>`;
  }
  return null;
}

function entries(v: unknown): [string, unknown][] {
  if (v instanceof Map) return [...v.entries()].map(([k, x]) => [String(k), x]);
  return Object.entries(v as object);
}

/** Short arrays of scalars stay on one line; everything else nests with two-space indents. */
export function renderTree(v: unknown, indent = ''): string {
  const out: string[] = [];
  const walk = (key: string, x: unknown, pad: string) => {
    const s = scalar(x);
    if (s !== null) {
      out.push(`${pad}${key}: ${s}`);
      return;
    }
    if (Array.isArray(x)) {
      const parts = x.map(scalar);
      if (parts.every((p) => p !== null) && parts.join(', ').length <= 100) {
        out.push(`${pad}${key}: [${parts.join(', ')}]`);
        return;
      }
      out.push(`${pad}${key}: (${x.length})`);
      x.forEach((item, i) => walk(`[${i}]`, item, `${pad}  `));
      return;
    }
    out.push(`${pad}${key}:`);
    for (const [k, y] of entries(x)) walk(k, y, `${pad}  `);
  };
  if (v && typeof v === 'object' && !Array.isArray(v) && !(v instanceof Uint8Array)) {
    for (const [k, x] of entries(v)) walk(k, x, indent);
  } else {
    walk('image', v, indent);
  }
  return `${out.join('\n')}\n`;
}

export async function runImage(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  if (sub !== 'show') throw new CliError('usage: migrate image show FILE [--json]', EXIT.badInput);
  const { values, positionals } = parse('image show', rest, { json: { type: 'boolean' } }, true);
  if (positionals.length !== 1) throw new CliError('usage: migrate image show FILE [--json]', EXIT.badInput);
  const file = positionals[0]!;
  let bytes: Buffer;
  try {
    bytes = readFileSync(file);
  } catch (err) {
    throw new CliError(`cannot read ${file}: ${(err as Error).message}`, EXIT.badInput);
  }
  let image: unknown;
  try {
    image = decodeImage(bytes);
  } catch (err) {
    throw new CliError(`${file} is not a msgpack image: ${(err as Error).message}`, EXIT.badInput);
  }
  if (values.json) {
    process.stdout.write(`${JSON.stringify(toJsonValue(image), null, 2)}\n`);
  } else {
    process.stdout.write(`image ${file} (${formatBytes(statSync(file).size)}, msgpack)\n${renderTree(image, '  ')}`);
  }
  return EXIT.ok;
}
