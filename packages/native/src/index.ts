/**
 * The typed face of the Rust engine. This package is the only code that loads index.node (addon.ts; built from
 * crates/tern-node by the bootstrap: cargo build, then `neon dist`). Everything else in Tern talks to
 * the engine through these functions and the Tracer class.
 */
import type {
  CheckReport,
  FreezeReport,
  KernelProbe,
  ProcessInventory,
  ThawReport,
  ThreadRegisters,
} from '@tern/protocol';
import { call, callSync, load, validateTarget, EngineError, type OpaqueBox } from './addon.js';

export { ADDON_PATH, EngineError, validateTarget } from './addon.js';
type TracerBox = OpaqueBox<'tracer'>;

/** Which kernel mechanisms this machine offers (each one actually tried, not guessed). */
export function probeKernel(): KernelProbe {
  return callSync('probe', () => load().probeKernel());
}

/** Everything /proc says about a process. Read-only: the process is not stopped. */
export function inspectProcess(pid: number): Promise<ProcessInventory> {
  return call('inspect', () => load().inspectProcess(pid));
}

/** The movability verdict for an inventory. Pure. */
export function checkInventory(inventory: ProcessInventory): CheckReport {
  return callSync('check', () => load().checkInventory(inventory));
}

/** Validates, inspects and checks a process: what `migrate check --pid` prints. */
export async function checkProcess(pid: number): Promise<{ inventory: ProcessInventory; report: CheckReport }> {
  validateTarget(pid);
  const inventory = await inspectProcess(pid);
  return { inventory, report: checkInventory(inventory) };
}

/**
 * A ptrace session on one target, owned by a dedicated tracer thread inside the engine.
 * freeze() seizes and stops every thread; thaw() puts registers back and detaches; while frozen,
 * syscall() runs a system call inside the target and readMemory/writeMemory access its memory.
 * Always close() (it thaws if needed), also on error paths.
 */
export class Tracer {
  private closed = false;
  private constructor(
    readonly pid: number,
    private readonly box: TracerBox,
  ) {}

  static open(pid: number): Tracer {
    validateTarget(pid);
    return new Tracer(pid, callSync('tracer', () => load().tracerOpen(pid)));
  }

  private live(): TracerBox {
    if (this.closed) throw new EngineError('tracer', `tracer for pid ${this.pid} is closed`);
    return this.box;
  }

  get frozen(): boolean {
    return !this.closed && load().tracerIsFrozen(this.box);
  }

  freeze(): Promise<FreezeReport> {
    return call('freeze', () => load().tracerFreeze(this.live()));
  }

  thaw(): Promise<ThawReport> {
    return call('thaw', () => load().tracerThaw(this.live()));
  }

  registers(): Promise<ThreadRegisters[]> {
    return call('registers', () => load().tracerRegisters(this.live()));
  }

  /** Runs syscall `nr` in the frozen target; resolves to the raw return value (-errno on failure). */
  syscall(nr: number, ...args: number[]): Promise<number> {
    return call('remote syscall', () => load().tracerSyscall(this.live(), nr, args));
  }

  readMemory(addr: number, len: number): Promise<Buffer> {
    return call('read memory', () => load().tracerReadMemory(this.live(), addr, len));
  }

  writeMemory(addr: number, data: Buffer): Promise<void> {
    return call('write memory', () => load().tracerWriteMemory(this.live(), addr, data));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await call('close', () => load().tracerClose(this.box));
    this.closed = true;
  }
}

/** x86_64 syscall numbers the control plane uses for remote syscalls. */
export const SYS = {
  read: 0,
  write: 1,
  close: 3,
  mmap: 9,
  mprotect: 10,
  munmap: 11,
  madvise: 28,
  getpid: 39,
  gettid: 186,
  prctl: 157,
  userfaultfd: 323,
} as const;
export * from './migration.js';
