// Helpers for tests driving the self-verifying workloads in test/workloads (see README.md / wl.h).
// ESM, Node built-ins only.
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export type Status = Record<string, string>;

const here = dirname(fileURLToPath(import.meta.url));

/** Absolute path of a built workload: test/workloads/bin/NAME (build with `make -C test/workloads`). */
export function workloadBin(name: string): string {
  // Works both from test/workloads/status.ts and from a compiled copy one level down (e.g. dist/).
  for (const dir of [here, dirname(here)]) {
    const p = join(dir, "bin", name);
    if (existsSync(p)) return p;
  }
  return join(here, "bin", name);
}

/** Parse one `key=value key=value ...` line (also accepts the stdout `ready pid=...` line). */
export function parseStatus(line: string): Status {
  const out: Status = {};
  for (const tok of line.trim().split(/\s+/)) {
    const eq = tok.indexOf("=");
    if (eq > 0) out[tok.slice(0, eq)] = tok.slice(eq + 1);
  }
  return out;
}

/** Read and parse the status file. Throws if it does not exist (yet). */
export function readStatus(file: string): Status {
  return parseStatus(readFileSync(file, "utf8"));
}

/** Numeric value of a status key (NaN if absent). */
export function num(status: Status, key: string): number {
  const v = status[key];
  return v === undefined ? NaN : Number(v);
}

/**
 * Poll the status file every 20 ms until predicate(status) is true; resolves with that status.
 * A missing/unreadable file counts as "not yet". Rejects after timeoutMs with the last status seen.
 */
export async function waitForStatus(
  file: string,
  predicate: (s: Status) => boolean,
  timeoutMs: number,
): Promise<Status> {
  const deadline = Date.now() + timeoutMs;
  let last: Status | undefined;
  for (;;) {
    try {
      last = readStatus(file);
      if (predicate(last)) return last;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    }
    if (Date.now() >= deadline) {
      const shown = last ? Object.entries(last).map(([k, v]) => `${k}=${v}`).join(" ") : "(no status file)";
      throw new Error(`waitForStatus(${file}) timed out after ${timeoutMs} ms; last: ${shown}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}
