import { type Kysely, sql } from 'kysely';
import type { DB } from '../db/schema.js';

/** One budget's bucket: how much it holds at most, and its refill a second. */
export interface BucketShape {
  size: number;
  perSecond: number;
}

export interface Take {
  taken: boolean;
  /** What the buckets held, refilled, before this take. */
  requests: number;
  tokens: number;
}

/**
 * Refills the fleet's buckets for `key` by the time since their last use
 * and takes one request and `tokens` tokens if both hold enough; else takes
 * nothing. One statement: the row lock serialises workers, and `now()` (the
 * statement's start, never later than the lock) refills on the database's
 * clock, so no worker's clock matters. A new key starts full.
 */
export async function takeFromFleetBuckets(
  db: Kysely<DB>,
  key: string,
  tokens: number,
  shape: { requests: BucketShape; tokens: BucketShape },
): Promise<Take> {
  const r = shape.requests;
  const t = shape.tokens;
  const take = () =>
    sql<Take>`
    with refilled as (
      select l.key,
        least(${r.size}::float8, l.requests
          + greatest(extract(epoch from now() - l.refreshed_at), 0) * ${r.perSecond}::float8) as requests,
        least(${t.size}::float8, l.tokens
          + greatest(extract(epoch from now() - l.refreshed_at), 0) * ${t.perSecond}::float8) as tokens
      from embedding_rate_limits l where l.key = ${key} for update)
    update embedding_rate_limits l set
      requests = f.requests - case when f.requests >= 1 and f.tokens >= ${tokens}::float8 then 1 else 0 end,
      tokens = f.tokens - case when f.requests >= 1 and f.tokens >= ${tokens}::float8 then ${tokens}::float8 else 0 end,
      refreshed_at = greatest(now(), l.refreshed_at)
    from refilled f where l.key = f.key
    returning f.requests >= 1 and f.tokens >= ${tokens}::float8 as taken, f.requests, f.tokens`.execute(
      db,
    );
  const { rows } = await take();
  if (rows[0]) return rows[0];
  // The key's first take anywhere: make its row, full, then take. One
  // statement a request from then on.
  await sql`insert into embedding_rate_limits (key, requests, tokens)
    values (${key}, ${r.size}, ${t.size}) on conflict (key) do nothing`.execute(db);
  const { rows: again } = await take();
  if (!again[0]) throw new Error(`rate bucket ${key} vanished`);
  return again[0];
}
