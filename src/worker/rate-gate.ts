export interface RateGate {
  /** Waits until one request of `tokens` tokens fits the per-minute budgets. */
  acquire(tokens: number): Promise<void>;
  /**
   * Seconds of sending at the full limit each budget holds now (undefined:
   * no such limit): 10 when full, near 0 while the gate paces requests.
   */
  budgetSeconds(): { requests: number | undefined; tokens: number | undefined };
}

/** The time a gate paces by. */
export interface RateGateClock {
  /** Milliseconds, never going back. */
  now(): number;
  /** Resolves once `ms` of this clock have passed. */
  sleep(ms: number): Promise<void>;
}

/**
 * performance.now() and the global setTimeout, looked up at each call, so
 * vitest's fake timers drive a gate made with this clock too.
 */
export const systemClock: RateGateClock = {
  now: () => performance.now(),
  sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
};

export interface RateGateOptions {
  clock?: RateGateClock;
  /**
   * Called at the moment a request is let through, before acquire() resolves:
   * with its token count and the clock's time. For tests that count what the
   * gate admits.
   */
  onAdmit?: (tokens: number, at: number) => void;
}

// A budget refills continuously, one minute's worth per minute, but holds at
// most 10 s of it: a full minute's burst at start would overrun a server
// whose own window is already partly used.
const BURST_FRACTION = 10 / 60;
// Pace 1% under the limit: our bucket and the server's refill on different
// clocks, and a request sent the millisecond ours holds enough can arrive when
// the server's holds a token less (seen against the test server: 429s at ~0.1%).
const HEADROOM = 0.99;
const MINUTE_MS = 60_000;

/**
 * Client-side --max-rpm / --max-tpm, enforced before each HTTP attempt with
 * the pre-counted tokens, so the provider's 429s stay rare rather than being
 * the pacing mechanism.
 */
export function createRateGate(
  limits: { maxRpm: number | undefined; maxTpm: number | undefined },
  options: RateGateOptions = {},
): RateGate {
  const clock = options.clock ?? systemClock;
  const requests = limits.maxRpm ? bucket(limits.maxRpm, clock) : undefined;
  const tokens = limits.maxTpm ? bucket(limits.maxTpm, clock) : undefined;
  const admit = (count: number) => () => options.onAdmit?.(count, clock.now());
  return {
    async acquire(count) {
      if (requests) await requests.take(1, tokens ? undefined : admit(count));
      // A request larger than the burst waits for a full bucket and then goes:
      // it could never pass otherwise.
      if (tokens) await tokens.take(Math.min(Math.max(count, 1), tokens.size), admit(count));
      if (!requests && !tokens) admit(count)();
    },
    budgetSeconds: () => ({ requests: requests?.heldSeconds(), tokens: tokens?.heldSeconds() }),
  };
}

function bucket(perMinute: number, clock: RateGateClock): TokenBucket {
  const { size, perSecond } = bucketShape(perMinute);
  return new TokenBucket(size, perSecond / 1000, clock);
}

/** A per-minute limit as a bucket: paced 1% under, holding 10 s of it. */
export function bucketShape(perMinute: number): { size: number; perSecond: number } {
  const rate = perMinute * HEADROOM;
  return {
    size: Math.max(Math.floor(rate * BURST_FRACTION), 1),
    perSecond: (rate / MINUTE_MS) * 1000,
  };
}

/**
 * A token bucket that starts full (a run may start with its burst), refills
 * continuously at `perMs`, and serves takers first come, first served: a
 * large request is not starved by small ones arriving after it.
 */
class TokenBucket {
  #content: number;
  #lastDrip: number;
  #queue: Promise<void> = Promise.resolve();

  constructor(
    readonly size: number,
    private readonly perMs: number,
    private readonly clock: RateGateClock,
  ) {
    this.#content = size;
    this.#lastDrip = clock.now();
  }

  /** Resolves once `count` (at most `size`) tokens are taken; `taken` runs at that moment. */
  take(count: number, taken?: () => void): Promise<void> {
    const turn = this.#queue.then(async () => {
      for (;;) {
        this.#drip();
        if (this.#content >= count) {
          this.#content -= count;
          taken?.();
          return;
        }
        await this.clock.sleep(Math.max(1, Math.ceil((count - this.#content) / this.perMs)));
      }
    });
    this.#queue = turn.catch(() => {});
    return turn;
  }

  /** What the bucket holds now, in seconds of its refill rate. */
  heldSeconds(): number {
    this.#drip();
    return this.#content / this.perMs / 1000;
  }

  #drip(): void {
    const now = this.clock.now();
    this.#content = Math.min(
      this.size,
      this.#content + Math.max(now - this.#lastDrip, 0) * this.perMs,
    );
    this.#lastDrip = now;
  }
}
