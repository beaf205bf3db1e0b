/**
 * The coordinator's side of the agent API: JSON over HTTP with the cluster token. Every failure
 * becomes an AgentCallError that says which host, which call, and whether the agent answered at all
 * (unreachable) or refused (status + its error body).
 */
import type { HostRecord } from '@tern/protocol';

export class AgentCallError extends Error {
  override name = 'AgentCallError';
  constructor(
    readonly host: string,
    readonly call: string,
    /** HTTP status, or null when the agent could not be reached / did not answer in time. */
    readonly status: number | null,
    /** The agent's machine code (`unavailable`, `not-found`, `validate`, ...), if it answered. */
    readonly code: string | null,
    message: string,
  ) {
    super(message);
  }

  get unreachable(): boolean {
    return this.status === null || this.status >= 502;
  }
}

export interface AgentClientOptions {
  token: string;
  /** Default per-call timeout; the long calls (dump, restore) pass their own. */
  timeoutMs?: number;
}

export class AgentClient {
  constructor(
    readonly host: HostRecord,
    private readonly opts: AgentClientOptions,
  ) {}

  async call<T>(method: 'GET' | 'POST', path: string, body?: unknown, timeoutMs?: number): Promise<T> {
    const what = `${method} ${path}`;
    const url = new URL(path, this.host.url.endsWith('/') ? this.host.url : `${this.host.url}/`).toString();
    let res: Response;
    try {
      res = await fetch(url, {
        method,
        headers: {
          authorization: `Bearer ${this.opts.token}`,
          ...(body !== undefined && { 'content-type': 'application/json' }),
        },
        ...(body !== undefined && { body: JSON.stringify(body) }),
        signal: AbortSignal.timeout(timeoutMs ?? this.opts.timeoutMs ?? 30_000),
      });
    } catch (err) {
      const cause = (err as { cause?: { code?: string; message?: string } }).cause;
      const why = (err as Error).name === 'TimeoutError' ? 'no answer in time' : (cause?.code ?? cause?.message ?? (err as Error).message);
      throw new AgentCallError(this.host.name, what, null, null, `agent ${this.host.name} (${this.host.url}) unreachable for ${what}: ${why}`);
    }
    const text = await res.text();
    let json: unknown;
    try {
      json = text ? JSON.parse(text) : undefined;
    } catch {
      json = undefined;
    }
    if (!res.ok) {
      const b = (json ?? {}) as { error?: string; message?: string };
      throw new AgentCallError(this.host.name, what, res.status, b.error ?? null, `agent ${this.host.name}: ${what} → ${res.status} ${b.message ?? text.slice(0, 200)}`);
    }
    return json as T;
  }
}
