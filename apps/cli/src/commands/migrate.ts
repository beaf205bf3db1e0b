/**
 * `migrate --from A --to B --pid N [--mode M] [--max-downtime MS] [--bandwidth MB/s]` (mode: hybrid by default):
 * starts a migration through a coordinator (or an embedded one) and follows it to the end.
 * Ctrl-C asks for an abort (before the commit point the process stays on the source); a second
 * Ctrl-C stops waiting.
 */
import { parseArgs } from 'node:util';
import { DEFAULT_MODE, MIGRATION_MODES, type MigrationEvent, type MigrationMode, type MigrationRecord } from '@tern/protocol';
import { ControlError, controlExit, openControl, type Control } from '../control.js';
import { CliError, EXIT } from '../exit-codes.js';
import { PlainProgress, renderReport, TtyProgress, type ProgressView } from '../progress.js';

export const TARGET_OPTIONS = {
  coordinator: { type: 'string' },
  token: { type: 'string' },
  lab: { type: 'string' },
  config: { type: 'string' },
  json: { type: 'boolean' },
} as const;

type Values<T> = { [K in keyof T]?: T[K] extends { type: 'boolean' } ? boolean : string };

export function parse<T extends Record<string, { type: 'string' | 'boolean' }>>(
  what: string,
  argv: string[],
  options: T,
  positionals = false,
): { values: Values<T>; positionals: string[] } {
  try {
    return parseArgs({ args: argv, options, strict: true, allowPositionals: positionals }) as unknown as { values: Values<T>; positionals: string[] };
  } catch (err) {
    throw new CliError(what === 'migrate' ? (err as Error).message : `${what}: ${(err as Error).message}`, EXIT.badInput);
  }
}

function positiveNumber(flag: string, v: string | undefined, integer: boolean): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0 || (integer && !Number.isInteger(n))) throw new CliError(`--${flag} ${v} is not a positive ${integer ? 'integer' : 'number'}`, EXIT.badInput);
  return n;
}

/** Exit code of a finished migration. */
export function exitCodeOf(rec: MigrationRecord): number {
  if (rec.state === 'done') return EXIT.ok;
  if (rec.state === 'aborted') return EXIT.aborted;
  switch (rec.failure?.kind) {
    case 'not-movable':
    case 'destination-not-ready':
      return EXIT.notMovable;
    case 'bad-input':
      return EXIT.badInput;
    case 'aborted':
      return EXIT.aborted;
    default:
      return EXIT.internal;
  }
}

export async function runMigrate(argv: string[]): Promise<number> {
  const { values } = parse('migrate', argv, {
    ...TARGET_OPTIONS,
    from: { type: 'string' },
    to: { type: 'string' },
    pid: { type: 'string' },
    mode: { type: 'string' },
    'max-downtime': { type: 'string' },
    bandwidth: { type: 'string' },
    'max-rounds': { type: 'string' },
    'no-auto-converge': { type: 'boolean' },
    'give-up-after': { type: 'string' },
  });
  if (!values.from || !values.to || values.pid === undefined) throw new CliError('migrate: --from HOST --to HOST --pid N are required (see migrate --help)', EXIT.badInput);
  if (!/^\d+$/.test(values.pid) || Number(values.pid) < 1) throw new CliError(`--pid ${values.pid} is not a process id`, EXIT.badInput);
  const mode = (values.mode ?? DEFAULT_MODE) as MigrationMode;
  if (!MIGRATION_MODES.includes(mode)) throw new CliError(`--mode ${values.mode} is not one of ${MIGRATION_MODES.join(', ')}`, EXIT.badInput);
  const maxDowntimeMs = positiveNumber('max-downtime', values['max-downtime'], true);
  const bandwidth = positiveNumber('bandwidth', values.bandwidth, false);
  const maxRounds = positiveNumber('max-rounds', values['max-rounds'], true);
  const giveUpAfter = positiveNumber('give-up-after', values['give-up-after'], false);
  if (giveUpAfter !== undefined && (giveUpAfter < 0.1 || giveUpAfter > 86400)) throw new CliError(`--give-up-after ${values['give-up-after']} must be between 0.1 and 86400 seconds`, EXIT.badInput);

  const control = await openControl(values);
  try {
    return await follow(control, values.json ?? false, () =>
      control.create({
        from: values.from!,
        to: values.to!,
        pid: Number(values.pid),
        mode,
        ...(maxDowntimeMs !== undefined && { maxDowntimeMs }),
        ...(bandwidth !== undefined && { bandwidth }),
        ...(maxRounds !== undefined && { maxRounds }),
        ...(values['no-auto-converge'] && { autoConverge: false }),
        ...(giveUpAfter !== undefined && { pullGiveUpMs: Math.round(giveUpAfter * 1000) }),
      }),
    );
  } finally {
    await control.close();
  }
}

async function follow(control: Control, json: boolean, start: () => Promise<MigrationRecord>): Promise<number> {
  let rec: MigrationRecord;
  try {
    rec = await start();
  } catch (err) {
    if (err instanceof ControlError) throw controlExit(err);
    throw err;
  }
  const events: MigrationEvent[] = [];
  const view: ProgressView | null = json ? null : process.stdout.isTTY ? new TtyProgress(process.stdout) : new PlainProgress(process.stdout);
  let interrupts = 0;
  const onInterrupt = () => {
    interrupts++;
    if (interrupts > 1) {
      view?.end();
      process.stderr.write(`migrate: stopped waiting; migration ${rec.id} goes on (migrate status ${rec.id})\n`);
      process.exit(EXIT.internal);
    }
    process.stderr.write(`\nmigrate: aborting ${rec.id} (Ctrl-C again to stop waiting)\n`);
    control.abort(rec.id).catch((err: Error) => process.stderr.write(`migrate: abort: ${err.message}\n`));
  };
  process.on('SIGINT', onInterrupt);
  try {
    rec = await control.follow(rec.id, (e) => {
      events.push(e);
      view?.event(e);
    });
  } catch (err) {
    if (err instanceof ControlError) throw controlExit(err);
    throw err;
  } finally {
    process.off('SIGINT', onInterrupt);
    view?.end();
  }
  process.stdout.write(json ? `${JSON.stringify({ migration: rec, events }, null, 2)}\n` : renderReport(rec));
  return exitCodeOf(rec);
}
