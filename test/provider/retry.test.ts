import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import {
  InputRejectedError,
  ProviderFatalError,
  ProviderTransientError,
  RetriesExhaustedError,
} from '../../src/errors.js';
import type { EmbeddingProvider } from '../../src/provider/client.js';
import { type RetryPolicy, withRetries } from '../../src/provider/retry.js';
import { providerFor, rejectionOf, useFakeServer } from './helpers.js';

// withRetries waits with node:timers/promises; this records each wait (its
// length, and how many requests the server had seen as it began and as it
// ended), so the tests count the waits instead of timing them.
const waits = vi.hoisted(
  () =>
    [] as Array<{ ms: number; requestsAtStart: number; requestsAtEnd?: number; aborted?: boolean }>,
);
const requestsSeen = vi.hoisted(() => ({ count: (): number => 0 }));
vi.mock('node:timers/promises', async (importOriginal) => {
  const actual = await importOriginal<typeof import('node:timers/promises')>();
  return {
    ...actual,
    setTimeout: async (ms: number, value?: unknown, options?: { signal?: AbortSignal }) => {
      const wait: (typeof waits)[number] = { ms, requestsAtStart: requestsSeen.count() };
      waits.push(wait);
      try {
        return await actual.setTimeout(ms, value, options);
      } catch (error) {
        wait.aborted = true;
        throw error;
      } finally {
        wait.requestsAtEnd = requestsSeen.count();
      }
    },
  };
});

const server = useFakeServer();
beforeEach(() => {
  waits.length = 0;
  requestsSeen.count = () => server.fake.stats.requests;
});
afterEach(() => {
  vi.useRealTimers();
});

/** Runs one embed under withRetries, recording every attempt and every retry. */
function embedWithRetries(
  inputs: string[],
  policy: Partial<RetryPolicy> = {},
  provider: EmbeddingProvider = providerFor(server.fake),
) {
  const calls = { attempts: 0, retries: [] as Array<{ attempt: number; delayMs: number }> };
  const promise = withRetries(
    () => {
      calls.attempts++;
      return provider.embed(inputs);
    },
    {
      maxRetries: 3,
      maxRetryWaitMs: 5_000,
      // Small so backoff-driven tests stay fast; retry-after tests do not use it.
      baseDelayMs: 10,
      onRetry: ({ attempt, delayMs }) => calls.retries.push({ attempt, delayMs }),
      ...policy,
    },
  );
  return { promise, calls };
}

describe('withRetries with the real provider', () => {
  it('two 500s then a success return the value after three attempts and two retries', async () => {
    server.fake.enqueueFault({ kind: 'server-error' }, { kind: 'server-error', status: 503 });
    const { promise, calls } = embedWithRetries(['hello']);
    const { value, attempts } = await promise;
    expect(value.vectors).toHaveLength(1);
    expect(attempts).toBe(3);
    expect(calls.retries.map((r) => r.attempt)).toEqual([1, 2]);
    expect(server.fake.stats.requests).toBe(3);
  });

  it('a dropped connection and a timeout are both retried to success', async () => {
    // The SDK's request timeout (a global setTimeout) runs in virtual time:
    // the hung attempt times out when the test says so, and the attempt after
    // it cannot time out however slow this machine is.
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    server.fake.enqueueFault({ kind: 'drop' }, { kind: 'hang', ms: 5_000 });
    const { promise } = embedWithRetries(
      ['hello'],
      {},
      providerFor(server.fake, { timeoutMs: 200 }),
    );
    await server.fake.until((stats) => stats.delayed === 1);
    vi.advanceTimersByTime(200);
    const { attempts } = await promise;
    expect(attempts).toBe(3);
    expect(server.fake.stats.requests).toBe(3);
  });

  it('a 429 with retry-after-ms 300 waits those 300 ms before the next attempt', async () => {
    server.fake.enqueueFault({ kind: 'rate-limit', retryAfterMs: 300 });
    const { promise, calls } = embedWithRetries(['hello']);
    const { attempts } = await promise;
    expect(attempts).toBe(2);
    expect(calls.retries).toEqual([{ attempt: 1, delayMs: 300 }]);
    // One wait, of 300 ms, begun after the first request and ended before the second.
    expect(waits).toEqual([{ ms: 300, requestsAtStart: 1, requestsAtEnd: 1 }]);
    expect(server.fake.stats.requests).toBe(2);
  });

  it('a retry-after of an hour is capped by maxRetryWaitMs', async () => {
    server.fake.enqueueFault({ kind: 'rate-limit', retryAfterSeconds: 3600 });
    const { promise, calls } = embedWithRetries(['hello'], { maxRetryWaitMs: 200 });
    const { attempts } = await promise;
    expect(attempts).toBe(2);
    expect(calls.retries).toEqual([{ attempt: 1, delayMs: 200 }]);
    expect(waits).toEqual([{ ms: 200, requestsAtStart: 1, requestsAtEnd: 1 }]);
  });

  it('a 401 is fatal and is not retried', async () => {
    server.fake.options.apiKey = 'the-right-key';
    const { promise, calls } = embedWithRetries(
      ['hello'],
      {},
      providerFor(server.fake, { apiKey: 'a-wrong-key' }),
    );
    expect(await rejectionOf(promise)).toBeInstanceOf(ProviderFatalError);
    expect(calls.attempts).toBe(1);
    expect(calls.retries).toEqual([]);
    expect(server.fake.stats.requests).toBe(1);
  });

  it('a 429 insufficient_quota is fatal and is not retried', async () => {
    server.fake.enqueueFault({ kind: 'insufficient-quota' });
    const { promise, calls } = embedWithRetries(['hello']);
    expect(await rejectionOf(promise)).toBeInstanceOf(ProviderFatalError);
    expect(calls.attempts).toBe(1);
    expect(calls.retries).toEqual([]);
    expect(server.fake.stats.requests).toBe(1);
  });

  it('an input over the context length is rejected without a retry', async () => {
    server.fake.options.maxInputTokens = 5;
    const { promise, calls } = embedWithRetries(['far too many tokens for a five token limit']);
    const error = await rejectionOf(promise);
    expect(error).toBeInstanceOf(InputRejectedError);
    expect(error).toMatchObject({ reason: 'context_length' });
    expect(calls.attempts).toBe(1);
    expect(server.fake.stats.requests).toBe(1);
  });

  it('maxRetries+1 transient failures end in RetriesExhaustedError counting every attempt', async () => {
    const maxRetries = 2;
    server.fake.enqueueFault(
      { kind: 'server-error' },
      { kind: 'server-error' },
      { kind: 'server-error' },
      // Would succeed, but must never be reached.
    );
    const { promise, calls } = embedWithRetries(['hello'], { maxRetries });
    const error = await rejectionOf(promise);
    expect(error).toBeInstanceOf(RetriesExhaustedError);
    expect(error).toMatchObject({ attempts: maxRetries + 1 });
    expect((error as Error).cause).toBeInstanceOf(ProviderTransientError);
    expect(calls.retries).toHaveLength(maxRetries);
    expect(server.fake.stats.requests).toBe(maxRetries + 1);
  });

  it('maxRetries 0 makes a single attempt and reports it as exhausted', async () => {
    server.fake.enqueueFault({ kind: 'server-error' });
    const { promise } = embedWithRetries(['hello'], { maxRetries: 0 });
    const error = await rejectionOf(promise);
    expect(error).toBeInstanceOf(RetriesExhaustedError);
    expect(error).toMatchObject({ attempts: 1 });
    expect(server.fake.stats.requests).toBe(1);
  });

  it('aborting the signal during a backoff wait stops promptly without another request', async () => {
    // An hour's wait: had the abort not cut it, the test would time out.
    server.fake.enqueueFault({ kind: 'rate-limit', retryAfterSeconds: 3600 });
    const controller = new AbortController();
    const { promise, calls } = embedWithRetries(['hello'], {
      maxRetryWaitMs: 3_600_000,
      signal: controller.signal,
      onRetry: () => {
        // Next turn of the event loop: the wait has begun by then.
        setImmediate(() => controller.abort());
      },
    });
    const error = await rejectionOf(promise);
    expect(waits).toEqual([{ ms: 3_600_000, requestsAtStart: 1, requestsAtEnd: 1, aborted: true }]);
    expect(error).toMatchObject({ name: 'AbortError' });
    expect(calls.attempts).toBe(1);
    expect(server.fake.stats.requests).toBe(1);
  });

  it('an already-aborted signal makes no request at all', async () => {
    const controller = new AbortController();
    controller.abort();
    const { promise, calls } = embedWithRetries(['hello'], { signal: controller.signal });
    await rejectionOf(promise);
    expect(calls.attempts).toBe(0);
    expect(server.fake.stats.requests).toBe(0);
  });
});
