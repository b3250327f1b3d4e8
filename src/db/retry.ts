import pRetry from 'p-retry';
import { DatabaseConnectionError, oneLine } from '../errors.js';
import type { Logger } from '../log.js';

// SQLSTATEs that mean the session is gone, not that the statement was wrong:
// class 08 (connection exception), 57P01 admin_shutdown (pg_terminate_backend,
// a fast shutdown), 57P02 crash_shutdown, 57P03 cannot_connect_now (starting up).
const LOST_SQLSTATE = /^(08...|57P0[123])$/;
const LOST_ERRNO = new Set(['ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH']);
// pg's own messages for a socket that closed under it or a pool that could not connect.
const LOST_MESSAGE =
  /Connection terminated|connection error and is not queryable|timeout exceeded when trying to connect|Client was closed/i;

/** True when the error means the connection was lost: the transaction rolled back and can be redone. */
export function isConnectionLost(error: unknown): boolean {
  for (let e = error, depth = 0; e && depth < 5; depth++) {
    const { code, message } = e as { code?: unknown; message?: unknown };
    if (typeof code === 'string' && (LOST_SQLSTATE.test(code) || LOST_ERRNO.has(code))) return true;
    if (typeof message === 'string' && LOST_MESSAGE.test(message)) return true;
    e = (e as { cause?: unknown }).cause;
  }
  return false;
}

// 55P03 lock_not_available (a batch's commit gave way at its lock_timeout),
// 40P01 deadlock_detected: the transaction rolled back whole and can be redone.
const CONTENDED_SQLSTATE = new Set(['55P03', '40P01']);

/** True when the transaction lost a lock wait to another one: redo it. */
export function isLockContention(error: unknown): boolean {
  return CONTENDED_SQLSTATE.has((error as { code?: unknown })?.code as string);
}

export interface DbRetryOptions {
  /** Give up once this long has passed since the first failure. */
  retryMs: number;
  log: Logger;
}

/**
 * Runs `fn` again while it fails with a lost connection or lost a lock wait
 * (see settleBatch's lock_timeout), with exponential
 * backoff (250 ms doubling to 5 s) for at most `retryMs`; then fails with a
 * DatabaseConnectionError (exit 1). `fn` must be safe to redo: a whole
 * transaction, or a read. Any other error is thrown at once.
 */
export async function withDbRetry<T>(
  what: string,
  fn: () => Promise<T>,
  options: DbRetryOptions,
): Promise<T> {
  const startedAt = Date.now();
  try {
    return await pRetry(fn, {
      retries: Number.POSITIVE_INFINITY,
      minTimeout: 250,
      maxTimeout: 5000,
      factor: 2,
      randomize: true,
      maxRetryTime: options.retryMs,
      shouldRetry: ({ error }) => isConnectionLost(error) || isLockContention(error),
      onFailedAttempt: ({ error, attemptNumber }) => {
        if (isLockContention(error)) {
          options.log.debug(
            { what, attempt: attemptNumber, err: oneLine(error) },
            'gave way to a concurrent transaction; retrying',
          );
          return;
        }
        if (!isConnectionLost(error)) return;
        options.log.warn(
          { what, attempt: attemptNumber, err: oneLine(error) },
          'database connection lost; retrying',
        );
      },
    });
  } catch (error) {
    if (!isConnectionLost(error)) throw error;
    throw new DatabaseConnectionError(
      `lost the database connection (${what}) and could not get it back within ${Date.now() - startedAt} ms (--db-retry-ms ${options.retryMs}): ${oneLine(error)}`,
      { cause: error },
    );
  }
}
