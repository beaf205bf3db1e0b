/** Exit codes of `migrate`, documented in the README and `migrate --help`. */
export const EXIT = {
  /** Success; for `check`: the process is movable. */
  ok: 0,
  /** `check`: the process cannot be moved (the reasons are printed). */
  notMovable: 1,
  /** Bad input: usage error, no such pid, a kernel thread, our own pid, a pid-namespace init, not root. */
  badInput: 2,
  /** Tern itself failed (engine error, internal bug). */
  internal: 3,
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
