/** Exit codes of `migrate`, documented in the README and `migrate --help`. */
export const EXIT = {
  /** Success; `check`: the process is movable; `migrate`: the process runs on the destination. */
  ok: 0,
  /** `check`: the process cannot be moved; `migrate`: refused before anything was touched (not movable,
   *  destination not ready); `abort`: too late (finished, or past the commit point). */
  notMovable: 1,
  /** Bad input: usage error, no such pid, a kernel thread, our own pid, a pid-namespace init, not root,
   *  an unknown host or migration id, a mode this build does not have, an unreadable image. */
  badInput: 2,
  /** Tern itself failed (engine or agent error, coordinator unreachable, engine not built); a migration
   *  that failed left the process running on the source. */
  internal: 3,
  /** `migrate`: aborted (on request, or by a coordinator restart): the process runs on the source. */
  aborted: 4,
} as const;

/** An error whose message is meant for the user as is, with the exit code it maps to. */
export class CliError extends Error {
  override name = 'CliError';
  constructor(
    message: string,
    readonly exitCode: number,
  ) {
    super(message);
  }
}
