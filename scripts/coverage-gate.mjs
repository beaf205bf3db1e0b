#!/usr/bin/env node
// Coverage thresholds for the TypeScript code, checked after a full tap run. tap 21 only knows
// "100% or allow incomplete"; these are the honest floors for this codebase (a fall below them
// means tests were lost), read from the json-summary report tap writes.
import { readFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const THRESHOLDS = { lines: 85, statements: 85, functions: 80, branches: 70 };

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const summary = JSON.parse(readFileSync(join(root, '.tap', 'report', 'coverage-summary.json'), 'utf8'));
const failures = Object.entries(THRESHOLDS)
  .filter(([metric, floor]) => summary.total[metric].pct < floor)
  .map(([metric, floor]) => `${metric} ${summary.total[metric].pct}% < ${floor}%`);
if (failures.length) {
  process.stderr.write(`coverage below the floor: ${failures.join(', ')}\n`);
  process.exit(1);
}
process.stdout.write(
  `coverage: ${Object.keys(THRESHOLDS).map((m) => `${m} ${summary.total[m].pct}%`).join(', ')} (floors ${JSON.stringify(THRESHOLDS)})\n`,
);
