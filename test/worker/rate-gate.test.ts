import { describe, expect, it } from 'vitest';
import { createRateGate } from '../../src/worker/rate-gate.js';

describe('the rate gate', () => {
  it('lets a burst of up to ten seconds of budget through, then paces tokens per minute', async () => {
    // 60,000 tokens a minute, paced 1% under: 990 a second, a 9,900-token burst.
    const gate = createRateGate({ maxRpm: undefined, maxTpm: 60_000 });
    const start = Date.now();
    await gate.acquire(9_900);
    expect(Date.now() - start).toBeLessThan(200);
    await gate.acquire(1_000);
    // About a second for the next thousand tokens to drip in.
    expect(Date.now() - start).toBeGreaterThanOrEqual(900);
  });

  it('paces requests per minute', async () => {
    // 600 a minute, paced 1% under: a burst of 99, then 9.9 a second.
    const gate = createRateGate({ maxRpm: 600, maxTpm: undefined });
    const start = Date.now();
    for (let i = 0; i < 99; i++) await gate.acquire(1);
    expect(Date.now() - start).toBeLessThan(200);
    for (let i = 0; i < 5; i++) await gate.acquire(1);
    expect(Date.now() - start).toBeGreaterThanOrEqual(400);
  });

  it('lets a request larger than the burst through once the bucket is full', async () => {
    const gate = createRateGate({ maxRpm: undefined, maxTpm: 6_000 });
    const start = Date.now();
    await gate.acquire(5_000);
    expect(Date.now() - start).toBeLessThan(200);
  });
});
