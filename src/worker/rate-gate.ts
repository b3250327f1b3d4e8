import { TokenBucket } from 'limiter';

export interface RateGate {
  /** Waits until one request of `tokens` tokens fits the per-minute budgets. */
  acquire(tokens: number): Promise<void>;
}

// A budget refills continuously, one minute's worth per minute, but holds at
// most 10 s of it: a full minute's burst at start would overrun a server
// whose own window is already partly used.
const BURST_FRACTION = 10 / 60;
// Pace 1% under the limit: our bucket and the server's refill on different
// clocks, and a request sent the millisecond ours holds enough can arrive when
// the server's holds a token less (seen against the test server: 429s at ~0.1%).
const HEADROOM = 0.99;

/**
 * Client-side --max-rpm / --max-tpm, enforced before each HTTP attempt with
 * the pre-counted tokens, so the provider's 429s stay rare rather than being
 * the pacing mechanism.
 */
export function createRateGate(limits: {
  maxRpm: number | undefined;
  maxTpm: number | undefined;
}): RateGate {
  const requests = limits.maxRpm ? bucket(limits.maxRpm) : undefined;
  const tokens = limits.maxTpm ? bucket(limits.maxTpm) : undefined;
  return {
    async acquire(count) {
      if (requests) await requests.removeTokens(1);
      // A request larger than the burst waits for a full bucket and then goes:
      // it could never pass otherwise.
      if (tokens) await tokens.removeTokens(Math.min(Math.max(count, 1), tokens.bucketSize));
    },
  };
}

function bucket(perMinute: number): TokenBucket {
  const rate = perMinute * HEADROOM;
  const size = Math.max(Math.floor(rate * BURST_FRACTION), 1);
  const b = new TokenBucket({ bucketSize: size, tokensPerInterval: rate, interval: 'minute' });
  // limiter's buckets start empty; a run may start with its burst.
  b.content = size;
  return b;
}
