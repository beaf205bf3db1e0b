/**
 * `migrate check`: runs locally through the native engine, no server needed.
 *   --pid N     inventory of the process (threads, VMAs by kind, fds by kind) and the verdict:
 *               movable, or not and why. Exit 0 movable, 1 not movable, 2 bad input.
 *   --kernel    which kernel mechanisms this machine has, each one actually tried.
 * Checking only reads /proc: the process is never stopped or signalled.
 */
import { parseArgs } from 'node:util';
import { checkProcess, EngineError, probeKernel } from '@tern/native';
import type { CheckReport, KernelProbe, ProcessInventory } from '@tern/protocol';
import { CliError, EXIT } from '../exit-codes.js';
import { formatBytes, table } from '../render.js';

export async function runCheck(argv: string[]): Promise<number> {
  let values: { pid?: string; kernel?: boolean; json?: boolean };
  try {
    ({ values } = parseArgs({
      args: argv,
      options: { pid: { type: 'string' }, kernel: { type: 'boolean' }, json: { type: 'boolean' } },
      strict: true,
    }));
  } catch (err) {
    throw new CliError(`check: ${(err as Error).message}`, EXIT.badInput);
  }
  if (values.kernel && values.pid !== undefined) throw new CliError('check: give either --pid N or --kernel, not both', EXIT.badInput);
  if (values.kernel) return checkKernel(values.json ?? false);
  if (values.pid === undefined) throw new CliError('check: --pid N or --kernel is required', EXIT.badInput);
  if (!/^\d+$/.test(values.pid)) throw new CliError(`check: --pid ${values.pid} is not a process id`, EXIT.badInput);
  return checkPid(Number(values.pid), values.json ?? false);
}

function checkKernel(json: boolean): number {
  const probe = probeKernel();
  process.stdout.write(json ? `${JSON.stringify(probe, null, 2)}\n` : renderKernel(probe));
  return EXIT.ok;
}

async function checkPid(pid: number, json: boolean): Promise<number> {
  let result: { inventory: ProcessInventory; report: CheckReport };
  try {
    result = await checkProcess(pid);
  } catch (err) {
    // validate/inspect failures are about the input (no such pid, kernel thread, ...): exit 2.
    if (err instanceof EngineError && (err.operation === 'validate' || err.operation === 'inspect')) {
      throw new CliError(err.message, EXIT.badInput);
    }
    throw err;
  }
  const { inventory, report } = result;
  process.stdout.write(json ? `${JSON.stringify({ movable: report.movable, report, inventory }, null, 2)}\n` : renderCheck(inventory, report));
  return report.movable ? EXIT.ok : EXIT.notMovable;
}

export function renderCheck(inv: ProcessInventory, report: CheckReport): string {
  const s = report.summary;
  const out: string[] = [];
  const nsNote = inv.nsPid !== inv.pid ? ` (pid ${inv.nsPid} in its own pid namespace)` : '';
  out.push(`pid ${inv.pid}${nsNote}: ${inv.comm}  ${inv.exe ?? '(no executable)'}`);
  out.push(`  cmdline   ${inv.cmdline.join(' ').trimEnd()}`);
  out.push(`  state     ${inv.state}, ppid ${inv.ppid}, session ${inv.session}, cwd ${inv.cwd ?? '?'}`);
  out.push(`  resident  ${formatBytes(report.residentBytes)}`);
  out.push('');
  out.push(`threads (${s.threads})`);
  out.push(table(inv.threads.map((th) => [th.tid, th.comm, th.state])));
  out.push('');
  const vmaTotal = s.vmaKinds.reduce((n, k) => n + k.count, 0);
  out.push(`memory mappings (${vmaTotal})`);
  out.push(table(s.vmaKinds.map((k) => [k.kind, k.count, formatBytes(k.bytes)])));
  out.push('');
  const fdTotal = s.fdKinds.reduce((n, k) => n + k.count, 0);
  out.push(`file descriptors (${fdTotal})`);
  out.push(fdTotal ? table(s.fdKinds.map((k) => [k.kind, k.count])) : '  none');
  out.push('');
  for (const w of report.warnings) out.push(`warning: ${w}`);
  if (report.movable) {
    out.push('movable: yes — every thread, mapping and file descriptor is of a kind Tern can move');
  } else {
    out.push(`movable: no — ${report.blockers.length} reason(s):`);
    for (const b of report.blockers) out.push(`  ✗ ${b.subject} [${b.kind}]: ${b.reason}`);
  }
  return `${out.join('\n')}\n`;
}

export function renderKernel(p: KernelProbe): string {
  const yes = (ok: boolean) => (ok ? 'yes' : 'no');
  const why = (err: string | null | undefined) => (err ? `  (${err})` : '');
  const rows: string[][] = [
    ['kernel', p.kernelRelease],
    ['soft-dirty', yes(p.softDirty.available) + why(p.softDirty.error)],
    ['userfaultfd', yes(p.userfaultfd.available) + (p.userfaultfd.available ? `  features: ${p.userfaultfd.featureNames.join(', ')}` : why(p.userfaultfd.error))],
    ['uffd WP_ASYNC', yes(p.uffdWpAsync.available) + why(p.uffdWpAsync.error)],
    ['PAGEMAP_SCAN', yes(p.pagemapScan.available) + why(p.pagemapScan.error)],
    ['TCP_REPAIR', yes(p.tcpRepair.available) + why(p.tcpRepair.error)],
    ['clone3 set_tid', yes(p.clone3SetTid.available) + why(p.clone3SetTid.error)],
    ['pidfd_getfd', yes(p.pidfdGetfd.available) + why(p.pidfdGetfd.error)],
    ['dirty tracking', p.dirtyTracking],
  ];
  return `${table(rows, '')}\n`;
}
