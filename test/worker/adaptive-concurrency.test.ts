import pLimit from 'p-limit';
import { describe, expect, it } from 'vitest';
import { createLogger } from '../../src/log.js';
import { AdaptiveConcurrency } from '../../src/worker/adaptive-concurrency.js';

describe('adaptive concurrency', () => {
  it('halves the batches in flight on a 429 and adds them back one by one after successes', () => {
    const limit = pLimit(8);
    let now = 50_000;
    const adaptive = new AdaptiveConcurrency(limit, 8, createLogger('silent'), () => now);
    adaptive.onRateLimited();
    expect(limit.concurrency).toBe(4);
    // A burst of 429s within a second counts once...
    now += 999;
    adaptive.onRateLimited();
    expect(limit.concurrency).toBe(4);
    // ...and one a second after the cut halves again.
    now += 1;
    adaptive.onRateLimited();
    expect(limit.concurrency).toBe(2);
    now += 1;
    adaptive.onRateLimited();
    expect(limit.concurrency).toBe(2);
    for (let i = 0; i < 2; i++) adaptive.onSuccess();
    expect(limit.concurrency).toBe(3);
    for (let i = 0; i < 3; i++) adaptive.onSuccess();
    expect(limit.concurrency).toBe(4);
    for (let i = 0; i < 4; i++) adaptive.onSuccess();
    expect(limit.concurrency).toBe(5);
    for (let i = 0; i < 100; i++) adaptive.onSuccess();
    expect(limit.concurrency).toBe(8);
  });

  it('never goes below one batch in flight', () => {
    const limit = pLimit(1);
    const adaptive = new AdaptiveConcurrency(limit, 1, createLogger('silent'));
    adaptive.onRateLimited();
    expect(limit.concurrency).toBe(1);
  });
});
