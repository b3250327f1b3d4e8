import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { createRateGate, type RateGateClock } from '../../src/worker/rate-gate.js';

// Every test runs in virtual time: vitest's fake timers stand in for
// performance.now() and setTimeout, which the gate's default clock uses. What
// is checked is counted on that clock, so CPU load cannot change it.
beforeEach(() => {
  vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'performance'] });
});
afterEach(() => {
  vi.useRealTimers();
});

interface Admission {
  tokens: number;
  /** Virtual milliseconds since the gate was made. */
  at: number;
}

/**
 * Calls acquire() for every size in `sizes` at once, as concurrent batches
 * would, and runs virtual time until all are let through.
 */
async function admitAll(limits: { maxRpm?: number; maxTpm?: number }, sizes: number[]) {
  const t0 = performance.now();
  const admitted: Admission[] = [];
  const gate = createRateGate(
    { maxRpm: limits.maxRpm, maxTpm: limits.maxTpm },
    { onAdmit: (tokens, at) => admitted.push({ tokens, at: at - t0 }) },
  );
  // The order acquire() calls resolve in: first come, first served, so a
  // large request is not starved by small ones asking after it.
  const resolved: number[] = [];
  const done = sizes.map((size, n) => gate.acquire(size).then(() => resolved.push(n)));
  await vi.runAllTimersAsync();
  await Promise.all(done);
  expect(resolved).toEqual(sizes.map((_, n) => n));
  return admitted;
}

/** Most tokens admitted in any window of `windowMs` (closed at both ends: the strictest reading). */
function mostInAnyWindow(admitted: Admission[], windowMs: number): number {
  let most = 0;
  for (const start of admitted) {
    const sum = admitted
      .filter((a) => a.at >= start.at && a.at <= start.at + windowMs)
      .reduce((s, a) => s + a.tokens, 0);
    most = Math.max(most, sum);
  }
  return most;
}

describe('the rate gate, in virtual time', () => {
  it('tells how many seconds of sending at the limit each budget holds', async () => {
    const gate = createRateGate({ maxRpm: undefined, maxTpm: 60_000 });
    // Full: ten seconds' worth.
    expect(gate.budgetSeconds()).toEqual({ requests: undefined, tokens: 10 });
    await gate.acquire(4_950);
    expect(gate.budgetSeconds().tokens).toBeCloseTo(5, 9);
    // Refilled at 0.99 a millisecond: 990 tokens, one more second, per second.
    await vi.advanceTimersByTimeAsync(1_000);
    expect(gate.budgetSeconds().tokens).toBeCloseTo(6, 9);
    await vi.advanceTimersByTimeAsync(60_000);
    expect(gate.budgetSeconds().tokens).toBe(10);
  });

  it('lets a burst of ten seconds of budget through at once, then paces tokens per minute', async () => {
    // 60,000 tokens a minute, paced 1% under: 0.99 a millisecond, a 9,900-token burst.
    const admitted = await admitAll({ maxTpm: 60_000 }, [9_900, 1_000]);
    expect(admitted[0]).toMatchObject({ tokens: 9_900, at: 0 });
    // The next thousand drip in over ceil(1000 / 0.99) ms, and not a millisecond sooner.
    expect(admitted[1]).toMatchObject({ tokens: 1_000, at: Math.ceil(1_000 / 0.99) });
  });

  it('never admits more than the burst plus the paced rate over any window, and no more than the limit per minute once the burst is spent', async () => {
    // 150 requests of 700 tokens (105,000 in all) under 60,000 TPM, all asking at once.
    const maxTpm = 60_000;
    const perMs = (maxTpm * 0.99) / 60_000;
    const burst = Math.floor(maxTpm * 0.99 * (10 / 60));
    const sizes = Array.from({ length: 150 }, () => 700);
    const admitted = await admitAll({ maxTpm }, sizes);

    expect(admitted).toHaveLength(150);
    // The burst: as many whole requests as 9,900 tokens hold, at time 0, and no more.
    expect(admitted.filter((a) => a.at === 0)).toHaveLength(Math.floor(burst / 700));
    // Over any window of w ms: at most the burst plus w ms of the paced rate.
    for (const w of [1, 100, 1_000, 10_000, 60_000, 120_000]) {
      expect(mostInAnyWindow(admitted, w), `window ${w} ms`).toBeLessThanOrEqual(burst + perMs * w);
    }
    // Once the first burst is spent, a minute holds the paced rate plus at most
    // the one request (and the rounding-up millisecond) the bucket held as it opened.
    const afterBurst = admitted.filter((a) => a.at >= 10_000);
    expect(mostInAnyWindow(afterBurst, 60_000)).toBeLessThanOrEqual(perMs * 60_000 + 700 + 1);
    // It paces, not stalls: the last request goes as soon as the bucket holds it.
    const total = sizes.reduce((a, b) => a + b, 0);
    const last = admitted.at(-1)?.at ?? 0;
    expect(last).toBeGreaterThanOrEqual((total - burst) / perMs);
    expect(last).toBeLessThanOrEqual((total - burst) / perMs + sizes.length);
  });

  it('paces requests per minute', async () => {
    // 600 a minute, paced 1% under: a burst of 99, then one every 1/0.0099 ms.
    const admitted = await admitAll(
      { maxRpm: 600 },
      Array.from({ length: 110 }, () => 1),
    );
    expect(admitted.filter((a) => a.at === 0)).toHaveLength(99);
    for (const w of [1, 1_000, 60_000]) {
      expect(mostInAnyWindow(admitted, w)).toBeLessThanOrEqual(99 + 0.0099 * w);
    }
    expect(admitted[99]?.at).toBe(Math.ceil(1 / 0.0099));
    expect(admitted.at(-1)?.at).toBeGreaterThanOrEqual(11 / 0.0099);
  });

  it('keeps both budgets when both are set', async () => {
    // 60 requests a minute (burst 9) and 600,000 tokens (never the constraint here).
    const admitted = await admitAll(
      { maxRpm: 60, maxTpm: 600_000 },
      Array.from({ length: 20 }, () => 100),
    );
    expect(admitted.filter((a) => a.at === 0)).toHaveLength(9);
    for (const w of [1, 10_000, 60_000]) {
      const requestsInWindow = mostInAnyWindow(
        admitted.map((a) => ({ ...a, tokens: 1 })),
        w,
      );
      expect(requestsInWindow).toBeLessThanOrEqual(9 + (60 * 0.99 * w) / 60_000);
    }
  });

  it('lets a request larger than the burst through once the bucket is full, then waits for a full bucket again', async () => {
    // 6,000 a minute: a 990-token bucket that refills in 10 s. The small request
    // asked last goes last, though the bucket held its 10 tokens long before.
    const admitted = await admitAll({ maxTpm: 6_000 }, [5_000, 5_000, 10]);
    expect(admitted.map((a) => a.at)).toEqual([0, 10_000, 10_000 + Math.ceil(10 / 0.099)]);
  });

  it('waits on the clock it is given, and on nothing else', async () => {
    vi.useRealTimers();
    let now = 1_000;
    const slept: number[] = [];
    const clock: RateGateClock = {
      now: () => now,
      sleep: async (ms) => {
        slept.push(ms);
        now += ms;
      },
    };
    const at: number[] = [];
    const gate = createRateGate(
      { maxRpm: undefined, maxTpm: 6_000 },
      { clock, onAdmit: (_tokens, t) => at.push(t) },
    );
    await gate.acquire(990);
    await gate.acquire(99);
    expect(slept).toEqual([1_000]);
    expect(at).toEqual([1_000, 2_000]);
  });
});
