/**
 * Named errors with a stable `code`. The CLI maps codes to exit codes and prints
 * `message` as one line; `cause` keeps the original for debug logs.
 */
export abstract class PgembedError extends Error {
  abstract readonly code: string;
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    // Logs and stack traces show ProviderFatalError, not Error.
    this.name = new.target.name;
  }
  /** Process exit code the CLI uses when this error ends a run. */
  readonly exitCode: number = 1;
}

/** A setting is missing or has a bad value. The message names the setting. */
export class ConfigError extends PgembedError {
  readonly code = 'CONFIG';
}

/** The database could not be reached or refused us (host, port, password, database name). */
export class DatabaseConnectionError extends PgembedError {
  readonly code = 'DB_CONNECT';
}

/**
 * The embedded database's directory is held by another live process that
 * cannot share it (it does not serve it, or it runs on another host).
 */
export class DatabaseBusyError extends PgembedError {
  readonly code = 'DB_BUSY';
}

/** Migrations could not be applied (e.g. pgvector forced but not installed). */
export class MigrationError extends PgembedError {
  readonly code = 'MIGRATION';
}

/** The provider refused in a way no retry or skip can fix: bad key, no quota, unknown model. */
export class ProviderFatalError extends PgembedError {
  readonly code = 'PROVIDER_FATAL';
  constructor(
    message: string,
    readonly status: number | undefined,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

/** Worth another attempt: 429, 408/409, 5xx, resets, timeouts. */
export class ProviderTransientError extends PgembedError {
  readonly code = 'PROVIDER_TRANSIENT';
  constructor(
    message: string,
    readonly status: number | undefined,
    /** Server-requested wait, before our cap is applied. */
    readonly retryAfterMs: number | undefined,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

export type SkipReason =
  | 'context_length'
  | 'retries_exhausted'
  | 'invalid_response'
  | 'rejected_input';

/**
 * The provider rejected an input (or inputs) of the request. `index` is the
 * culprit's position in the request when the server names it; otherwise the
 * caller isolates the culprit by splitting the batch.
 */
export class InputRejectedError extends PgembedError {
  readonly code = 'INPUT_REJECTED';
  constructor(
    message: string,
    readonly reason: SkipReason,
    readonly index: number | undefined,
    readonly limitTokens: number | undefined,
    readonly status: number | undefined,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

/** A transient failure outlived --max-retries; `attempts` counts every try. */
export class RetriesExhaustedError extends PgembedError {
  readonly code = 'RETRIES_EXHAUSTED';
  constructor(
    message: string,
    readonly attempts: number,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

/** The response broke the contract: wrong count, wrong dimension, non-finite values. */
export class InvalidResponseError extends PgembedError {
  readonly code = 'INVALID_RESPONSE';
  constructor(
    message: string,
    /** Position of the bad vector in the request, when one vector is to blame. */
    readonly index: number | undefined,
  ) {
    super(message);
  }
}

/** The thread that counts tokens failed or stopped (tokens.ts): nothing can be sent unmeasured. */
export class TokenCountError extends PgembedError {
  readonly code = 'TOKEN_COUNT';
}

/** Strict mode met an input it cannot embed; the message names it and the way out. */
export class StrictModeError extends PgembedError {
  readonly code = 'STRICT_SKIP';
}

/**
 * The circuit breaker tripped in a one-shot run: several batches in a row
 * exhausted their retries, so the provider is failing, not one input. The
 * run stops (exit 1) rather than mark every message it reaches as skipped;
 * the messages stay pending for the next run.
 */
export class ProviderFailingError extends PgembedError {
  readonly code = 'PROVIDER_FAILING';
}

/**
 * --max-tokens or --max-cost-usd was reached: no new batch is taken, the
 * batches in flight commit, and the run ends with exit 3. The messages not
 * embedded stay pending for a later run (or the next day, for a watcher).
 */
export class BudgetReachedError extends PgembedError {
  readonly code = 'BUDGET';
  override readonly exitCode = 3;
}

/** A signal stopped the run; exit 130 for SIGINT, 143 for SIGTERM. */
export class InterruptedError extends PgembedError {
  readonly code = 'INTERRUPTED';
  override readonly exitCode: number;
  constructor(readonly signal: NodeJS.Signals) {
    super(`interrupted by ${signal}`);
    this.exitCode = signal === 'SIGINT' ? 130 : 143;
  }
}

/** Anything thrown, as an Error. */
export function asError(value: unknown): Error {
  return value instanceof Error ? value : new Error(String(value));
}

/** First line of any error, for the one-line messages the CLI prints. */
export function oneLine(error: unknown): string {
  const text = error instanceof Error ? error.message : String(error);
  return text.split('\n')[0]?.trim() || 'unknown error';
}
