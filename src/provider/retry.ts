import { setTimeout as sleep } from 'node:timers/promises';
import pRetry from 'p-retry';
import { ProviderTransientError, RetriesExhaustedError } from '../errors.js';

export interface RetryPolicy {
  maxRetries: number;
  /** Cap on any one wait, server-requested or ours. */
  maxRetryWaitMs: number;
  /** First backoff step; doubles per attempt. */
  baseDelayMs?: number;
  signal?: AbortSignal | undefined;
  onRetry?: (info: { error: ProviderTransientError; attempt: number; delayMs: number }) => void;
}

/**
 * The one retry owner (the SDK's own retries are off). Only transient errors
 * are retried; the wait is the server's retry-after when it sends one, else
 * exponential backoff with jitter, and never more than maxRetryWaitMs.
 */
export async function withRetries<T>(
  fn: () => Promise<T>,
  policy: RetryPolicy,
): Promise<{ value: T; attempts: number }> {
  // A stopped run starts no new request; one already answered is kept.
  policy.signal?.throwIfAborted();
  let attempts = 0;
  const base = policy.baseDelayMs ?? 500;
  try {
    const value = await pRetry(
      async () => {
        attempts++;
        return fn();
      },
      {
        retries: policy.maxRetries,
        // p-retry's own delay is zero: we sleep in onFailedAttempt, where the
        // error (and its retry-after) is known.
        minTimeout: 0,
        maxTimeout: 0,
        randomize: false,
        // The stop signal is not p-retry's: p-retry checks it after an attempt
        // returns and would discard an answer already received (and paid for).
        // It cuts only the waits between attempts, below.
        shouldRetry: ({ error }) => error instanceof ProviderTransientError,
        onFailedAttempt: async ({ error, attemptNumber, retriesLeft }) => {
          if (!(error instanceof ProviderTransientError) || retriesLeft === 0) return;
          const backoff = base * 2 ** (attemptNumber - 1) * (0.5 + Math.random() / 2);
          const delayMs = Math.round(
            Math.min(error.retryAfterMs ?? backoff, policy.maxRetryWaitMs),
          );
          policy.onRetry?.({ error, attempt: attemptNumber, delayMs });
          await sleep(delayMs, undefined, { signal: policy.signal });
        },
      },
    );
    return { value, attempts };
  } catch (error) {
    if (error instanceof ProviderTransientError) {
      throw new RetriesExhaustedError(
        `gave up after ${attempts} attempts: ${error.message}`,
        attempts,
        { cause: error },
      );
    }
    throw error;
  }
}
