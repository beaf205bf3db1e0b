/**
 * What this agent holds for each migration it plays a role in: a page server and then a restored
 * process (destination), or a frozen original (source). In memory only: if the agent dies, the engine
 * keeps a frozen source frozen (DESIGN.md: never run twice) and the coordinator resolves the rest.
 */
import type { AgentMigrationStatus, AgentRole, AgentSessionState, PrecopyStartRequest } from '@tern/protocol';
import type { PageServerHandle, PrecopyHandle, SourceSessionHandle } from './engine.js';
import { CpuThrottle } from './throttle.js';

export class AgentSession {
  state: AgentSessionState;
  restoredPid: number | null = null;
  error: string | null = null;
  readonly createdAt = new Date().toISOString();
  updatedAt = this.createdAt;
  pageServer: PageServerHandle | null = null;
  /** Destination: the page server's credentials, which the post-copy pull to the source uses too. */
  pageCredentials: { migrationId: string; token: string } | null = null;
  source: SourceSessionHandle | null = null;
  /** Source in pre-copy: the engine's tracking session until the switchover finishes it. */
  precopy: PrecopyHandle | null = null;
  precopyOptions: PrecopyStartRequest | null = null;
  /** Auto-converge's CPU throttle of the source process, if pre-copy needed one. */
  throttle: CpuThrottle | null = null;
  private throttleUnavailable: string | null = null;
  /** The long call in progress (freeze+dump, or restore), so that abort can wait for it. */
  inFlight: Promise<unknown> | null = null;
  /** process.hrtime.bigint() at the freeze: the source's frozen time is measured from here. */
  frozenAt: bigint | null = null;
  /**
   * Service addresses this agent moved for the migration (released at the source, claimed at the
   * destination) and how to give them back; undo() runs it.
   */
  handoff: { addresses: string[]; giveBack: () => Promise<void> } | null = null;
  private undone: Promise<void> | null = null;

  constructor(
    readonly id: string,
    readonly role: AgentRole,
    readonly pid: number,
    state: AgentSessionState,
  ) {
    this.state = state;
  }

  set(state: AgentSessionState, error?: string): void {
    this.state = state;
    if (error !== undefined) this.error = error;
    this.updatedAt = new Date().toISOString();
  }

  /** A state test TypeScript does not narrow on: the state changes under our feet across awaits. */
  is(...states: AgentSessionState[]): boolean {
    return states.includes(this.state);
  }

  /** Holds engine state that must be committed or aborted (a page server, a tracer, a restored process). */
  get active(): boolean {
    return !['committed', 'aborted'].includes(this.state);
  }

  /**
   * Puts things back as they were before this migration, once (later calls share the first):
   * destination — kill the process it rebuilt, release the service addresses it took and close the
   * page server; source — take the service addresses back and thaw the original.
   */
  undo(): Promise<void> {
    // A failed attempt is forgotten, so that the coordinator's retry tries again.
    this.undone ??= (async () => {
      if (this.role === 'destination') {
        if (this.restoredPid !== null) {
          try {
            process.kill(this.restoredPid, 'SIGKILL');
          } catch {
            /* already gone */
          }
        }
        await this.handoff?.giveBack();
        await this.pageServer?.close();
      } else {
        // The address first: the original must be reachable the moment it runs again.
        await this.handoff?.giveBack();
        await this.precopy?.abort();
        this.precopy = null;
        await this.releaseThrottle();
        await this.source?.abort();
      }
    })().catch((err: unknown) => {
      this.undone = null;
      throw err;
    });
    return this.undone;
  }

  /**
   * One more auto-converge step for the source process; false when no step is left or throttling
   * is impossible here (the reason is kept in `throttleUnavailable` and reported once).
   */
  async throttleStep(): Promise<boolean> {
    if (this.throttleUnavailable !== null) return false;
    this.throttle ??= await CpuThrottle.open(this.pid, this.id);
    if (this.throttle.unavailable) {
      this.throttleUnavailable = this.throttle.unavailable;
      this.error = `auto-converge unavailable: ${this.throttle.unavailable}`;
      return false;
    }
    const before = this.throttle.current()?.percentOff ?? 0;
    const now = await this.throttle.step();
    return now !== null && now.percentOff > before;
  }

  /** Gives the process its CPU back (idempotent). */
  async releaseThrottle(): Promise<void> {
    await this.throttle?.release();
  }

  status(): AgentMigrationStatus {
    return {
      id: this.id,
      role: this.role,
      state: this.state,
      pid: this.pid,
      restoredPid: this.restoredPid,
      error: this.error,
      createdAt: this.createdAt,
      updatedAt: this.updatedAt,
    };
  }
}

/** Sessions by migration id; finished ones are kept (bounded) so that status and retries still answer. */
export class SessionTable {
  private readonly sessions = new Map<string, AgentSession>();
  constructor(private readonly keepFinished = 1000) {}

  get(id: string): AgentSession | undefined {
    return this.sessions.get(id);
  }

  add(session: AgentSession): void {
    this.sessions.set(session.id, session);
    this.prune();
  }

  delete(id: string): void {
    this.sessions.delete(id);
  }

  all(): AgentSession[] {
    return [...this.sessions.values()];
  }

  private prune(): void {
    const finished = this.all().filter((s) => !s.active);
    for (const s of finished.slice(0, Math.max(0, finished.length - this.keepFinished))) this.sessions.delete(s.id);
  }
}
