import type { Kysely } from 'kysely';
import type { DB } from '../db/schema.js';
import { type BucketShape, takeFromFleetBuckets } from '../sql/rate-limits.js';
import { bucketShape, type RateGate, type RateGateClock, systemClock } from './rate-gate.js';

// No limit of a kind: a bucket that never runs dry (finite, for float8).
const UNLIMITED: BucketShape = { size: 1e15, perSecond: 1e15 };

/**
 * --max-rpm / --max-tpm for the fleet: every worker of the same provider,
 * model and API key draws on one pair of buckets in the database
 * (embedding_rate_limits), paced as the local gate paces one process (1%
 * under the limit, 10 s of burst). Each request costs a round trip; a
 * refused take waits what the buckets say is missing, then asks again.
 * Workers should be given the same limits: the last to refill sets the shape.
 */
export function createFleetRateGate(
  db: Kysely<DB>,
  key: string,
  limits: { maxRpm: number | undefined; maxTpm: number | undefined },
  clock: RateGateClock = systemClock,
): RateGate {
  const shape = {
    requests: limits.maxRpm ? bucketShape(limits.maxRpm) : UNLIMITED,
    tokens: limits.maxTpm ? bucketShape(limits.maxTpm) : UNLIMITED,
  };
  let last = { requests: shape.requests.size, tokens: shape.tokens.size };
  return {
    async acquire(count) {
      // A request larger than the burst waits for a full bucket, then goes.
      const need = Math.min(Math.max(count, 1), shape.tokens.size);
      for (;;) {
        const take = await takeFromFleetBuckets(db, key, need, shape);
        last = take.taken
          ? { requests: take.requests - 1, tokens: take.tokens - need }
          : { requests: take.requests, tokens: take.tokens };
        if (take.taken) return;
        const waitSeconds = Math.max(
          (1 - take.requests) / shape.requests.perSecond,
          (need - take.tokens) / shape.tokens.perSecond,
        );
        await clock.sleep(Math.max(1, Math.ceil(waitSeconds * 1000)));
      }
    },
    budgetSeconds: () => ({
      requests: limits.maxRpm ? last.requests / shape.requests.perSecond : undefined,
      tokens: limits.maxTpm ? last.tokens / shape.tokens.perSecond : undefined,
    }),
  };
}
