#!/usr/bin/env node
// `npm run bench`: runs every test/bench/*.bench.mjs in turn (each exports `name` and `run()`
// returning { rows: [{ metric, unit, median, p99, n, note? }] }), then writes
// bench-results/<stamp>.json and a short markdown table next to it, and prints the table.
import { mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..');
const only = process.argv[2];

const files = readdirSync(here).filter((f) => f.endsWith('.bench.mjs') && (!only || f.includes(only))).sort();
const results = [];
for (const file of files) {
  const mod = await import(join(here, file));
  process.stderr.write(`[bench] ${mod.name} ...\n`);
  const started = Date.now();
  const out = await mod.run();
  results.push({ bench: mod.name, file, seconds: (Date.now() - started) / 1000, ...out });
}

const stamp = new Date().toISOString().replace(/[:.]/g, '-');
const dir = join(root, 'bench-results');
mkdirSync(dir, { recursive: true });
const meta = { date: new Date().toISOString(), node: process.version, kernel: (await import('node:os')).release(), cpus: (await import('node:os')).cpus().length };
writeFileSync(join(dir, `${stamp}.json`), `${JSON.stringify({ meta, results }, null, 2)}\n`);

const fmt = (x) => (typeof x === 'number' ? (Math.abs(x) >= 100 ? x.toFixed(0) : x.toPrecision(3)) : String(x ?? ''));
let md = `| bench | metric | median | p99 | unit | n | note |\n|---|---|---|---|---|---|---|\n`;
for (const r of results) for (const row of r.rows) md += `| ${r.bench} | ${row.metric} | ${fmt(row.median)} | ${fmt(row.p99)} | ${row.unit} | ${row.n} | ${row.note ?? ''} |\n`;
writeFileSync(join(dir, `${stamp}.md`), md);
process.stdout.write(`${md}\nresults: ${join('bench-results', `${stamp}.json`)}\n`);
