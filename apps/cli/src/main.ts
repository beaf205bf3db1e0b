#!/usr/bin/env node
/**
 * `migrate`: Tern's command line.
 *
 *   migrate check --pid N [--json]      can this process be moved? (local, through the native engine)
 *   migrate check --kernel [--json]     which kernel mechanisms does this machine have?
 *   migrate --from A --to B --pid N     migrate a process (through a coordinator, or an embedded one)
 *   migrate list | status ID | abort ID the coordinator's records
 *   migrate image show FILE             a process image, readably
 *
 * The path of a command: main.ts parses argv → commands/*.ts → a coordinator (control.ts: over HTTP,
 * or embedded) → the agents → @tern/native → crates/tern-node → crates/tern-core → the kernel.
 * `migrate check` goes to @tern/native directly.
 */
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { CliError, EXIT } from './exit-codes.js';
import { runCheck } from './commands/check.js';
import { runImage } from './commands/image.js';
import { runMigrate } from './commands/migrate.js';
import { runAbort, runList, runStatus } from './commands/records.js';
import { defaultLab, insideLabClient, labClientNetns } from './control.js';

const HELP = `usage:
  migrate check --pid N [--json]      inventory of a process and whether Tern can move it
  migrate check --kernel [--json]     kernel mechanisms available on this machine
  migrate --from HOST --to HOST --pid N [--mode hybrid|precopy|postcopy|cold]
          [--max-downtime MS] [--bandwidth MB/s] [--max-rounds N] [--no-auto-converge]
          [--give-up-after SECONDS] [--json]
                                      migrate a process. hybrid (the default): memory sent in
                                      rounds while it runs, then it resumes on HOST after a freeze
                                      for its state only and pulls its last dirty pages from the
                                      source; precopy: the same rounds, then frozen while the last
                                      dirty pages move (rounds stop when the predicted downtime is
                                      under --max-downtime, the dirty set stops shrinking, or after
                                      --max-rounds; a process dirtying faster than the link is
                                      CPU-throttled unless --no-auto-converge); postcopy: no rounds,
                                      it resumes at once and pulls all its memory (faults first,
                                      the rest in the background, capped by --bandwidth; if the
                                      source stays unreachable for --give-up-after seconds, default
                                      30, the copy is killed and the original resumes on the
                                      source); cold: frozen while all its memory moves
  migrate list [--limit N] [--json]   the latest migrations
  migrate status ID [--events] [--json]
  migrate abort ID [--json]           roll back before the commit point
  migrate image show FILE [--json]    a process image (msgpack), readably

where the requests go (migrate, list, status, abort):
  --coordinator URL [--token T]       a running tern-coordinator (token: TERN_API_TOKEN)
  --lab NAME                          an embedded coordinator and the agents of lab NAME
                                      (deploy/lab/lab up NAME --agents); pids as seen in its hosts
  --config FILE                       else TERN_CONFIG, else ./tern.json: { "coordinator": URL } or
                                      { "hosts": { NAME: AGENT_URL }, "clusterToken": T } (embedded);
                                      else the only lab that runs agents

On a terminal, a progress bar (phase, round, bytes, dirty rate, ETA) and a final report; plain lines
otherwise; --json prints one JSON document at the end. Ctrl-C aborts the migration (before its
commit point the process stays on the source).

exit codes:
  0  ok: check: movable; migrate: the process runs on the destination
  1  check: not movable; migrate: refused before anything was touched (not movable, destination not
     ready); abort: too late (finished, or past the commit point)
  2  bad input: usage, no such pid, kernel thread, our own process, a pid-namespace init, not root,
     unknown host or migration, a mode this build does not have, an unreadable image
  3  Tern itself failed (engine or agent error, coordinator unreachable, engine not built); a failed
     migration left the process running on the source
  4  migrate: aborted (on request or by a coordinator restart): the process runs on the source`;

/** Commands that talk to agents: with a lab they run inside its client network namespace. */
const LAB_COMMANDS = new Set(['list', 'status', 'abort']);

function labOf(argv: string[]): string | undefined {
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--lab') return argv[i + 1];
    if (argv[i]!.startsWith('--lab=')) return argv[i]!.slice(6);
  }
  return undefined;
}

/**
 * Lab agents listen on addresses that exist only inside the lab: re-run this command in the lab's
 * client network namespace (only the network namespace: pids and files stay ours). Returns the exit
 * code, or null when already there / no lab is involved.
 */
async function viaLab(argv: string[]): Promise<number | null> {
  const [command] = argv;
  if (!(command?.startsWith('--') || LAB_COMMANDS.has(command ?? ''))) return null;
  let lab = labOf(argv);
  let args = argv;
  if (lab === undefined) {
    const opts = { ...(argv.includes('--coordinator') && { coordinator: 'x' }), ...(argv.includes('--config') && { config: 'x' }) };
    const found = await defaultLab(opts);
    if (!found) return null;
    lab = found;
    args = [...argv, '--lab', lab];
  }
  if (!/^[a-z0-9-]{1,12}$/.test(lab)) throw new CliError(`--lab ${lab}: not a lab name`, EXIT.badInput);
  if (insideLabClient(lab)) return null;
  const r = spawnSync('ip', ['netns', 'exec', labClientNetns(lab), process.execPath, fileURLToPath(import.meta.url), ...args], { stdio: 'inherit' });
  if (r.error) throw new CliError(`cannot enter lab ${lab}: ${r.error.message}`, EXIT.internal);
  return r.status ?? EXIT.internal;
}

async function main(argv: string[]): Promise<number> {
  const [command] = argv;
  if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(`${HELP}\n`);
    return command === undefined ? EXIT.badInput : EXIT.ok;
  }
  const viaLabCode = await viaLab(argv);
  if (viaLabCode !== null) return viaLabCode;
  switch (command) {
    case 'check':
      return runCheck(argv.slice(1));
    case 'list':
      return runList(argv.slice(1));
    case 'status':
      return runStatus(argv.slice(1));
    case 'abort':
      return runAbort(argv.slice(1));
    case 'image':
      return runImage(argv.slice(1));
    default:
      if (command.startsWith('--')) return runMigrate(argv);
      throw new CliError(`unknown command '${command}' (see migrate --help)`, EXIT.badInput);
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    if (err instanceof CliError) {
      process.stderr.write(`migrate: ${err.message}\n`);
      process.exitCode = err.exitCode;
    } else {
      process.stderr.write(`migrate: internal error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      process.exitCode = EXIT.internal;
    }
  },
);
