import type { LimitFunction } from 'p-limit';
import type { Logger } from '../log.js';

/**
 * Additive increase, multiplicative decrease on the batches in flight: a 429
 * halves them (at most once a second, since one burst brings several 429s at
 * once), and each run of successes as long as the current level adds one
 * back, up to --concurrency.
 */
export class AdaptiveConcurrency {
  #successes = 0;
  #lastCutAt = 0;

  constructor(
    private readonly limit: LimitFunction,
    private readonly max: number,
    private readonly log: Logger,
    /** Milliseconds; injectable so tests count 429s in virtual time. */
    private readonly now: () => number = Date.now,
  ) {}

  get current(): number {
    return this.limit.concurrency;
  }

  onRateLimited(): void {
    const now = this.now();
    if (now - this.#lastCutAt < 1000 || this.limit.concurrency === 1) return;
    this.#lastCutAt = now;
    this.#successes = 0;
    this.limit.concurrency = Math.max(1, Math.floor(this.limit.concurrency / 2));
    this.log.warn({ concurrency: this.limit.concurrency }, 'rate limited: fewer batches in flight');
  }

  onSuccess(): void {
    if (this.limit.concurrency >= this.max) return;
    if (++this.#successes >= this.limit.concurrency) {
      this.#successes = 0;
      this.limit.concurrency += 1;
      this.log.debug({ concurrency: this.limit.concurrency }, 'recovering concurrency');
    }
  }
}
