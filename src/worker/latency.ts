/**
 * Latencies in fixed buckets, so a worker that runs for weeks keeps a few
 * hundred counters, not a sample per batch: 10% apart from 0.1 ms up
 * (quantiles within 10%), plus one bucket above the last bound.
 */
export class LatencyHistogram {
  static readonly #BOUNDS_MS: readonly number[] = (() => {
    const bounds: number[] = [];
    // 0.1 ms to ~1 h: 0.1 × 1.1^k.
    for (let b = 0.1; b < 3_600_000; b *= 1.1) bounds.push(b);
    return bounds;
  })();
  readonly #counts = new Array<number>(LatencyHistogram.#BOUNDS_MS.length + 1).fill(0);
  #count = 0;
  #maxMs = 0;

  record(ms: number): void {
    const bounds = LatencyHistogram.#BOUNDS_MS;
    let lo = 0;
    let hi = bounds.length;
    // The first bound at or above ms.
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((bounds[mid] as number) < ms) lo = mid + 1;
      else hi = mid;
    }
    this.#counts[lo] = (this.#counts[lo] as number) + 1;
    this.#count++;
    this.#maxMs = Math.max(this.#maxMs, ms);
  }

  get count(): number {
    return this.#count;
  }

  /** The upper bound of the bucket holding the q-quantile (never above the max seen); null when empty. */
  quantile(q: number): number | null {
    if (this.#count === 0) return null;
    const rank = Math.max(1, Math.ceil(q * this.#count));
    let seen = 0;
    for (const [i, n] of this.#counts.entries()) {
      seen += n;
      if (seen >= rank) {
        return Math.min(LatencyHistogram.#BOUNDS_MS[i] ?? this.#maxMs, this.#maxMs);
      }
    }
    return this.#maxMs;
  }

  /** p50, p99 and max in whole milliseconds, for logs. */
  summary(): { p50_ms: number | null; p99_ms: number | null; max_ms: number | null } {
    const round = (x: number | null) => (x === null ? null : Math.round(x * 10) / 10);
    return {
      p50_ms: round(this.quantile(0.5)),
      p99_ms: round(this.quantile(0.99)),
      max_ms: this.#count === 0 ? null : round(this.#maxMs),
    };
  }
}
