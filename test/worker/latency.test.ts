import { describe, expect, it } from 'vitest';
import { LatencyHistogram } from '../../src/worker/latency.js';

describe('LatencyHistogram', () => {
  it('is empty until something is recorded', () => {
    const h = new LatencyHistogram();
    expect(h.quantile(0.5)).toBeNull();
    expect(h.summary()).toEqual({ p50_ms: null, p99_ms: null, max_ms: null });
  });

  it('puts quantiles within 10% of the true ones, and never above the max', () => {
    const h = new LatencyHistogram();
    // 1..1000 ms: the true p50 is 500, p99 is 990.
    for (let ms = 1; ms <= 1000; ms++) h.record(ms);
    expect(h.count).toBe(1000);
    const p50 = h.quantile(0.5) as number;
    const p99 = h.quantile(0.99) as number;
    expect(p50).toBeGreaterThanOrEqual(500);
    expect(p50).toBeLessThanOrEqual(550);
    expect(p99).toBeGreaterThanOrEqual(990);
    expect(p99).toBeLessThanOrEqual(1000);
    expect(h.summary().max_ms).toBe(1000);
  });

  it('keeps one value exactly, and a value past the last bound as the max', () => {
    const h = new LatencyHistogram();
    h.record(3.3);
    expect(h.quantile(0.5)).toBe(3.3);
    h.record(10 * 3_600_000);
    expect(h.quantile(1)).toBe(10 * 3_600_000);
  });
});
