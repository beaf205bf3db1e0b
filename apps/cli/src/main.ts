#!/usr/bin/env node
/**
 * `migrate`: Tern's command line.
 *
 *   migrate check --pid N [--json]      can this process be moved? (local, through the native engine)
 *   migrate check --kernel [--json]     which kernel mechanisms does this machine have?
 *   migrate --from A --to B --pid N     live-migrate a process (arrives with the migration engine)
 *
 * The path of a command: main.ts parses argv → commands/*.ts → @tern/native → crates/tern-node →
 * crates/tern-core (proc, check, ptrace, remote) → the kernel.
 */
import { CliError, EXIT } from './exit-codes.js';
import { runCheck } from './commands/check.js';

const HELP = `usage:
  migrate check --pid N [--json]      inventory of a process and whether Tern can move it
  migrate check --kernel [--json]     kernel mechanisms available on this machine
  migrate --from HOST --to HOST --pid N [--mode cold|precopy|postcopy|hybrid]
                                      live-migrate a process (not available in this build yet)
  migrate list | status ID | abort ID | image show FILE   (not available in this build yet)

exit codes: 0 ok (check: movable), 1 not movable, 2 bad input (usage, no such pid, kernel thread,
our own process, a pid-namespace init, not root), 3 Tern itself failed`;

const NOT_YET = (what: string) =>
  new CliError(
    `${what} is not available in this build yet: Tern can inspect and check processes today (migrate check); ` +
      'moving them arrives with the migration engine',
    EXIT.badInput,
  );

async function main(argv: string[]): Promise<number> {
  const [command] = argv;
  if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(`${HELP}\n`);
    return command === undefined ? EXIT.badInput : EXIT.ok;
  }
  switch (command) {
    case 'check':
      return runCheck(argv.slice(1));
    case 'list':
    case 'status':
    case 'abort':
    case 'image':
      throw NOT_YET(`migrate ${command}`);
    default:
      if (command.startsWith('--')) throw NOT_YET('live migration (migrate --from … --to … --pid …)');
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
