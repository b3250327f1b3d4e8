import { type Kysely, sql } from 'kysely';
import type { MessageSource } from '../db/names.js';
import type { DB } from '../db/schema.js';
import { sourceRelation } from '../db/source.js';

export interface Pruned {
  runs: number;
  batches: number;
  skips: number;
  /** Skips older than the cutoff kept: their message is still not embedded. */
  skipsKept: number;
}

/**
 * Deletes history older than `olderThan` (a Postgres interval) in one
 * transaction: skips no longer relevant, finished runs, and batch rows.
 *
 * Kept whatever their age: each (provider, model)'s latest run, every run
 * still running, and the latest skip of each message that is still as it
 * was when skipped and still has no embedding of that text (what `status`
 * and the next run's exit code count). A run holding such a skip is kept
 * too: its skips go with it (ON DELETE CASCADE). Batch rows go by their own
 * age, a long-lived watcher's included: the run row holds its totals.
 */
export async function pruneHistory(
  db: Kysely<DB>,
  source: MessageSource,
  olderThan: string,
): Promise<Pruned> {
  const cutoff = sql`now() - ${olderThan}::interval`;
  const relevant = sql`(
    select l.run_id, l.message_id from (
      select distinct on (provider, model, message_id)
        run_id, provider, model, message_id, content_sha256
      from embedding_skips order by provider, model, message_id, created_at desc) l
    join ${sourceRelation(source)} m on m.id = l.message_id
      and sha256(convert_to(m.content, 'UTF8')) = l.content_sha256
    where not exists (select 1 from message_embeddings e
      where e.provider = l.provider and e.model = l.model and e.message_id = l.message_id
        and e.content_sha256 = l.content_sha256))`;
  const count = async (query: ReturnType<typeof sql<{ n: number }>>) =>
    (await query.execute(db)).rows[0]?.n ?? 0;
  const skips = await count(sql<{ n: number }>`
    with gone as (
      delete from embedding_skips s
      where s.created_at < ${cutoff}
        and not exists (select 1 from ${relevant} r
                        where r.run_id = s.run_id and r.message_id = s.message_id)
      returning 1)
    select count(*)::int as n from gone`);
  // Every old skip left now is one still relevant: counted after, not
  // worked out twice.
  const skipsKept = await count(sql<{ n: number }>`
    select count(*)::int as n from embedding_skips where created_at < ${cutoff}`);
  // The runs to go, found once: their batches are counted in the snapshot
  // the delete starts from (they go with them, ON DELETE CASCADE).
  const { rows } = await sql<{ runs: number; batches: number }>`
    with doomed as (
      select r.id from embedding_runs r
      where r.status <> 'running' and coalesce(r.finished_at, r.heartbeat_at) < ${cutoff}
        and r.id not in (select max(id) from embedding_runs group by provider, model)
        and not exists (select 1 from embedding_skips s where s.run_id = r.id)),
    gone as (delete from embedding_runs where id in (select id from doomed) returning 1)
    select (select count(*)::int from gone) as runs,
      (select count(*)::int from embedding_batches
        where run_id in (select id from doomed)) as batches`.execute(db);
  const runs = rows[0]?.runs ?? 0;
  const batchesOfRuns = rows[0]?.batches ?? 0;
  const batches = await count(sql<{ n: number }>`
    with gone as (delete from embedding_batches where committed_at < ${cutoff} returning 1)
    select count(*)::int as n from gone`);
  return { runs, batches: batchesOfRuns + batches, skips, skipsKept };
}
