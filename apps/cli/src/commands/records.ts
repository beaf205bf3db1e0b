/** `migrate list`, `migrate status ID`, `migrate abort ID`: the coordinator's records. */
import { ControlError, controlExit, openControl } from '../control.js';
import { CliError, EXIT } from '../exit-codes.js';
import { renderList, renderReport, renderStatus } from '../progress.js';
import { parse, TARGET_OPTIONS } from './migrate.js';

async function withControl<T>(values: Parameters<typeof openControl>[0], fn: (c: Awaited<ReturnType<typeof openControl>>) => Promise<T>): Promise<T> {
  const control = await openControl(values);
  try {
    return await fn(control);
  } catch (err) {
    if (err instanceof ControlError) throw controlExit(err);
    throw err;
  } finally {
    await control.close();
  }
}

export async function runList(argv: string[]): Promise<number> {
  const { values } = parse('list', argv, { ...TARGET_OPTIONS, limit: { type: 'string' } });
  if (values.limit !== undefined && !/^\d{1,4}$/.test(values.limit)) throw new CliError(`--limit ${values.limit} is not a count`, EXIT.badInput);
  const recs = await withControl(values, (c) => c.list(values.limit ? Number(values.limit) : 50));
  process.stdout.write(values.json ? `${JSON.stringify(recs, null, 2)}\n` : renderList(recs));
  return EXIT.ok;
}

function oneId(what: string, positionals: string[]): string {
  if (positionals.length !== 1 || !/^[A-Za-z0-9_-]{1,64}$/.test(positionals[0]!)) throw new CliError(`${what}: give one migration id (see migrate list)`, EXIT.badInput);
  return positionals[0]!;
}

export async function runStatus(argv: string[]): Promise<number> {
  const { values, positionals } = parse('status', argv, { ...TARGET_OPTIONS, events: { type: 'boolean' } }, true);
  const id = oneId('status', positionals);
  const [rec, events] = await withControl(values, async (c) => [await c.get(id), values.events ? await c.events(id) : []] as const);
  process.stdout.write(values.json ? `${JSON.stringify(values.events ? { migration: rec, events } : rec, null, 2)}\n` : renderStatus(rec, events));
  return EXIT.ok;
}

export async function runAbort(argv: string[]): Promise<number> {
  const { values, positionals } = parse('abort', argv, TARGET_OPTIONS, true);
  const id = oneId('abort', positionals);
  const rec = await withControl(values, (c) => c.abort(id));
  process.stdout.write(values.json ? `${JSON.stringify(rec, null, 2)}\n` : renderReport(rec));
  return rec.state === 'aborted' ? EXIT.ok : EXIT.internal;
}
