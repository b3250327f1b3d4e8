import { describe, expect, it } from 'vitest';
import { takeFromFleetBuckets } from '../../src/sql/rate-limits.js';
import { backends, useMigratedDatabase } from '../support/db.js';

// Refills too slow to matter between two statements (0.001 a second), so
// what one take leaves is what the next one finds.
const shape = {
  requests: { size: 100, perSecond: 0.001 },
  tokens: { size: 1000, perSecond: 0.001 },
};

describe.each(backends())('the fleet rate buckets on %s', (backend) => {
  const database = useMigratedDatabase(backend);

  it('start full, are shared by every worker of a key, and keep each key apart', async () => {
    const db = () => database().db;
    const key = 'openai/small/0123456789abcdef';
    const first = await takeFromFleetBuckets(db(), key, 600, shape);
    expect(first.taken).toBe(true);
    expect(first.tokens).toBeCloseTo(1000, 2);
    // Another worker of the same key finds what the first one left.
    const second = await takeFromFleetBuckets(db(), key, 600, shape);
    expect(second.taken).toBe(false);
    expect(second.tokens).toBeCloseTo(400, 2);
    expect(second.requests).toBeCloseTo(99, 2);
    // Refused, it took nothing: what is left still serves a smaller request.
    const third = await takeFromFleetBuckets(db(), key, 400, shape);
    expect(third.taken).toBe(true);
    // Another model (OpenAI limits each apart) has budgets of its own.
    const other = await takeFromFleetBuckets(db(), 'openai/large/0123456789abcdef', 600, shape);
    expect(other).toMatchObject({ taken: true });
    expect(other.tokens).toBeCloseTo(1000, 2);
  });
});
