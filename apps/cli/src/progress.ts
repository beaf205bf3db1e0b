/**
 * How `migrate` shows a migration: on a TTY one line redrawn in place (phase bar, round, bytes, dirty
 * rate, ETA) with log lines scrolling above it; otherwise one plain line per event; and at the end a
 * report (downtime, total time, bytes moved, rounds) or why it did not happen.
 */
import type { MigrationEvent, MigrationRecord, MigrationState } from '@tern/protocol';
import { PHASES } from '@tern/protocol';
import { formatBytes, table } from './render.js';

export function formatMs(ms: number | null | undefined): string {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return '—';
  if (ms < 1) return `${(ms * 1000).toFixed(0)} µs`;
  if (ms < 1000) return `${ms.toFixed(ms < 10 ? 2 : 1)} ms`;
  return `${(ms / 1000).toFixed(2)} s`;
}

const BAR_WIDTH = 24;

export interface ProgressView {
  event(e: MigrationEvent): void;
  /** Ends the live display (the report is printed separately). */
  end(): void;
}

export class TtyProgress implements ProgressView {
  private state: MigrationState = 'checking';
  private round = 0;
  private bytes = 0;
  private dirtyRate: number | null = null;
  private eta: number | null = null;
  private readonly started = Date.now();
  private drawn = false;
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly out: NodeJS.WriteStream) {
    // Redraw every 200 ms so the elapsed time moves during a long phase.
    this.timer = setInterval(() => this.draw(), 200);
    this.timer.unref();
    this.draw();
  }

  private line(): string {
    const idx = Math.max(0, PHASES.indexOf(this.state));
    const final = ['done', 'aborted', 'failed'].includes(this.state);
    const filled = Math.round((final && this.state === 'done' ? 1 : idx / (PHASES.length - 1)) * BAR_WIDTH);
    const bar = `${'█'.repeat(filled)}${'░'.repeat(BAR_WIDTH - filled)}`;
    const dirty = this.dirtyRate === null ? '—' : `${formatBytes(this.dirtyRate)}/s`;
    const eta = this.eta === null ? '—' : formatMs(this.eta * 1000);
    const elapsed = formatMs(Date.now() - this.started);
    return `${this.state.padEnd(10)} ▕${bar}▏ round ${this.round}  ${formatBytes(this.bytes).padStart(9)}  dirty ${dirty}  ETA ${eta}  ${elapsed}`;
  }

  private draw(): void {
    this.out.write(`\r\x1b[2K${this.line()}`);
    this.drawn = true;
  }

  event(e: MigrationEvent): void {
    this.state = e.state;
    if (e.progress) {
      this.round = e.progress.round;
      this.bytes = e.progress.bytes;
      this.dirtyRate = e.progress.dirtyRateBytesPerSec;
      this.eta = e.progress.etaSeconds;
    }
    if (e.type === 'result' && e.record) {
      this.state = e.record.state;
      this.bytes = e.record.stats.bytes;
    }
    if (e.type === 'log' || e.type === 'phase') {
      // Scroll the message above the bar, then redraw the bar under it.
      this.out.write(`\r\x1b[2K  ${e.message}\n`);
    }
    this.draw();
  }

  end(): void {
    clearInterval(this.timer);
    if (this.drawn) {
      this.draw();
      this.out.write('\n');
    }
  }
}

export class PlainProgress implements ProgressView {
  private readonly started = Date.now();
  constructor(private readonly out: NodeJS.WritableStream) {}

  event(e: MigrationEvent): void {
    if (e.type === 'result') return; // the report says it
    const t = ((Date.now() - this.started) / 1000).toFixed(3).padStart(8);
    const p = e.progress ? ` [round ${e.progress.round}, ${formatBytes(e.progress.bytes)}]` : '';
    this.out.write(`${t}s ${e.state.padEnd(10)} ${e.message}${p}\n`);
  }

  end(): void {}
}

/** The final report of a migration, for people. */
export function renderReport(rec: MigrationRecord): string {
  const s = rec.stats;
  const out: string[] = [];
  if (rec.state === 'done') {
    out.push(`migrated pid ${rec.pid} from ${rec.from} to ${rec.to} (${rec.mode}) — done`);
    const pages = `${s.pages.data} data, ${s.pages.zero} zero${s.pages.lazy ? `, ${s.pages.lazy} lazy` : ''} pages`;
    out.push(
      table([
        ['downtime', formatMs(s.downtimeMs)],
        ['total time', formatMs(s.totalMs)],
        ['bytes moved', `${formatBytes(s.bytes)} (${pages})`],
        ['rounds', String(s.rounds)],
        ...(s.homing ? [['post-copy', homingLine(s.homing, rec.from)] as [string, string]] : []),
        ['now', `pid ${s.restoredPid ?? rec.pid} on ${rec.to}`],
      ]),
    );
  } else {
    const f = rec.failure;
    out.push(`migration ${rec.id} of pid ${rec.pid} from ${rec.from} to ${rec.to}: ${rec.state}${f ? ` during ${f.phase}` : ''}`);
    if (f) out.push(`  ${f.message}`);
    for (const b of f?.blockers ?? []) out.push(`  ✗ ${b.subject} [${b.kind}]: ${b.reason}`);
    if (f?.kind === 'bad-input') {
      // nothing ran: there is no process to speak of
    } else if (rec.state === 'aborted' || rec.state === 'failed') out.push(`  pid ${rec.pid} runs on ${rec.from}, as before`);
    else out.push(`  still in progress (${rec.state}); see: migrate status ${rec.id}`);
    if (s.totalMs !== null) out.push(`  total time ${formatMs(s.totalMs)}`);
  }
  return `${out.join('\n')}\n`;
}

/** How the pages left on the source came home (post-copy, hybrid). */
export function homingLine(h: NonNullable<MigrationRecord['stats']['homing']>, from: string): string {
  const home = h.homeMs !== null ? `, all home ${formatMs(h.homeMs)} after the resume` : '';
  const reconnects = h.reconnects ? `, ${h.reconnects} reconnect${h.reconnects > 1 ? 's' : ''}` : '';
  return `${h.remotePages} pages pulled from ${from}: ${h.faultPages} on fault (p50 ${h.faultP50Ms.toFixed(2)} ms, p99 ${h.faultP99Ms.toFixed(2)} ms), ${h.backgroundPages} in the background${home}${reconnects}`;
}

/** One line per migration for `migrate list`. */
export function renderList(recs: MigrationRecord[]): string {
  if (!recs.length) return 'no migrations\n';
  const rows: (string | number)[][] = [['ID', 'STATE', 'PID', 'FROM', 'TO', 'MODE', 'DOWNTIME', 'BYTES', 'CREATED']];
  for (const r of recs) {
    rows.push([r.id, r.state, String(r.pid), r.from, r.to, r.mode, formatMs(r.stats.downtimeMs), formatBytes(r.stats.bytes), r.createdAt]);
  }
  return `${table(rows, '')}\n`;
}

/** `migrate status ID`: the record, for people. */
export function renderStatus(rec: MigrationRecord, events: MigrationEvent[] = []): string {
  const out = [
    `migration ${rec.id}: ${rec.state}${rec.committed ? ' (past the commit point)' : ''}${rec.abortRequested && rec.state !== 'aborted' ? ' (abort requested)' : ''}`,
    table([
      ['pid', String(rec.pid)],
      ['from → to', `${rec.from} → ${rec.to}`],
      ['mode', rec.mode],
      ['created', rec.createdAt],
      ['finished', rec.finishedAt ?? '—'],
      ['downtime', formatMs(rec.stats.downtimeMs)],
      ['total time', formatMs(rec.stats.totalMs)],
      ['bytes moved', formatBytes(rec.stats.bytes)],
      ['rounds', String(rec.stats.rounds)],
      ...(rec.stats.homing ? [['post-copy', homingLine(rec.stats.homing, rec.from)] as [string, string]] : []),
    ]),
  ];
  if (rec.failure) out.push(`  ${rec.failure.kind} during ${rec.failure.phase}: ${rec.failure.message}`);
  if (events.length) {
    out.push('events:');
    for (const e of events) out.push(`  ${e.at}  ${e.state.padEnd(10)} ${e.message}`);
  }
  return `${out.join('\n')}\n`;
}
