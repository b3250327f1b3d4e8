import { type Kysely, type RawBuilder, sql, type Transaction } from 'kysely';
import type { DB } from '../db/schema.js';
import type { BatchRecord, EmbeddedRow, SkippedRow } from './batches.js';
import { type ClaimScope, idArray } from './queue.js';

type Db = Kysely<DB> | Transaction<DB>;

/** What became of each message a batch claimed, for its commit. */
export interface Settlement {
  /** Each claimed message's queue row version, as read (ClaimedMessage.version). */
  versions: Record<string, string>;
  embedded: EmbeddedRow[];
  skipped: SkippedRow[];
  /** Claimed, found gone: their embeddings (every model's) are orphans. */
  gone: string[];
  /** Claimed, found blank: never embedded; the target's old embedding goes. */
  blank: string[];
  /** Claimed, found with an embedding of their current content: nothing to do. */
  unchanged: string[];
  /** Claimed and failed for now (retries exhausted): back in the queue after a backoff. */
  deferred: string[];
  /** Why they were deferred, for `embedding_queue.last_error`. */
  deferredError?: string;
  /** Claimed and not handled (a stop, a strict-mode cut): back in the queue at once. */
  released: string[];
}

/**
 * How the batch's vectors are written by the statement: a CTE body that
 * writes those of `rows` whose ids the CTE `settled (id)` returns
 * (EmbeddingWriter.inSettle), or nothing when they are written after it.
 */
export type VectorStep = (rows: EmbeddedRow[]) => RawBuilder<unknown> | undefined;

/** The messages the batch handled, one way or another: what the fence is asked to settle. */
export function handledIds(work: Settlement): string[] {
  return [
    ...work.embedded.map((e) => e.messageId),
    ...work.skipped.map((s) => s.messageId),
    ...work.gone,
    ...work.blank,
    ...work.unchanged,
  ];
}

export interface SettleOptions {
  vectors: VectorStep;
  /**
   * On a server: the queue rows are waited for this long at most, and a
   * batch already recorded (a lost answer whose commit landed) settles
   * nothing. Undefined with one session, where neither can happen.
   */
  lockTimeout?: string;
}

export interface Settled {
  /** The batch's row existed already: nothing was done. */
  recorded: boolean;
  /** The messages whose queue rows this run still held, unchanged: what was written. */
  ids: Set<string>;
}

/**
 * A batch's commit as one statement: the fence, then, for the messages it
 * settled, their vectors, skips and deletions, the rest given back, and the
 * batch's row with the run's counts. On a server the statement is the whole
 * transaction: one round trip, where a transaction of a statement each took
 * five (begin, the fence, the upsert, the batch row, commit), and the commit
 * of 64 short messages took half as long, 17-23 ms against 37-41 at the
 * median (BENCHMARKS.md, "seventh pass").
 *
 * The fence deletes the queue rows of the handled messages that this run
 * still holds at the version each was read at: only those may be written.
 * A row another worker took over, or whose message changed since the claim
 * (the capture trigger updated it: a new version), stays in the queue, to be
 * claimed and embedded again; on a source without triggers a change is
 * found by the next scan, as every change there is. The condition is on the
 * queue row alone, so a row a writer's trigger holds is waited for, then
 * rechecked at its new version, and no message is read. The delete locks
 * the rows, so a trigger re-enqueueing one of them waits for this commit and
 * then inserts it afresh. Every other part reads `settled`, so it runs
 * after the fence; data-modifying CTEs all see the statement's snapshot, so
 * the queue rows given back are picked among those the fence did not
 * delete, never read as deleted.
 *
 * Locks, on a server: the capture triggers lock queue rows inside the
 * application's transactions, in their order, and this statement locks
 * them in its own. It gives way first (lock_timeout, set in each queue
 * part's own condition, which is met before any of its rows is locked), so a
 * deadlock never picks the application; the batch is redone (withDbRetry).
 * The run's row is the run's alone, and its batches queue on it by design:
 * the timeout is lifted before it, as an argument that needs every other
 * part's count (an argument is computed before its call; the order of CTEs
 * is not defined), and the run's row is locked only once the batch's row,
 * which reads that, exists.
 */
export async function settleBatch(
  db: Db,
  scope: ClaimScope,
  batch: BatchRecord | undefined,
  work: Settlement,
  options: SettleOptions,
): Promise<Settled> {
  const ids = (list: string[]) => idArray(scope, list);
  const handled = handledIds(work);
  const guarded = options.lockTimeout !== undefined;
  const waitAtMost = guarded
    ? sql`set_config('lock_timeout', ${options.lockTimeout}, true) is not null and`
    : sql``;
  // Evaluated in each part that changes the queue, in the statement's one
  // snapshot: a redo finds the batch recorded everywhere or nowhere. Rows it
  // handled and gave back may have been claimed again by this run since.
  const recorded =
    guarded && batch
      ? sql`exists (select 1 from embedding_batches
                    where run_id = ${batch.runId} and batch_no = ${batch.batchNo})`
      : sql`false`;
  const target = sql`provider = ${scope.provider} and model = ${scope.model}`;
  const parts: Array<[string, RawBuilder<unknown>]> = [];
  // The run's own rows, tested on each row and never looked up by index:
  // `claimed_by = run` drew the planner to the `claimed_by` index, whose
  // entries of rows settled since the last vacuum it walks whole. PGlite
  // never vacuums, so a 64-message commit walked every row of the run so
  // far, 20,020 entries 0.4 ms twice by the 20,000th message, growing
  // without end. `message_id = any(ids)` probes the primary key for the
  // batch's own rows alone.
  const heldByRun = sql`q.target_id = ${scope.targetId}
    and q.claimed_by is not distinct from ${scope.runId}`;
  parts.push([
    'settled',
    // Each row's version is matched as one text in a hashed array: joined
    // to an unnest of (id, version), PGlite planned a nested loop that
    // unnested and cast the batch's arrays again for each of its rows, 4.9
    // of a 64-message commit's 6.3 ms (BENCHMARKS.md, "tenth pass").
    sql`delete from embedding_queue q
      where ${waitAtMost} not ${recorded} and ${heldByRun}
        and q.message_id = any(${ids(handled)})
        and q.message_id::text || '@' || q.xmin::text
          = any(${handled.map((id) => `${id}@${work.versions[id] ?? '0'}`)}::text[])
      returning q.message_id as id`,
  ]);
  const vectors = options.vectors(work.embedded);
  if (vectors) parts.push(['written', vectors]);
  if (work.skipped.length > 0) {
    const s = work.skipped;
    parts.push([
      'skips',
      sql`insert into embedding_skips
          (run_id, provider, model, message_id, reason, detail, input_tokens, content_sha256)
        select ${scope.runId}, ${scope.provider}, ${scope.model}, k.id, k.reason, k.detail,
          k.tokens, decode(k.sha, 'hex')
        from unnest(${ids(s.map((r) => r.messageId))}, ${s.map((r) => r.reason)}::text[],
          ${s.map((r) => r.detail)}::text[], ${s.map((r) => r.inputTokens)}::int[],
          ${s.map((r) => r.sha256Hex)}::text[]) as k(id, reason, detail, tokens, sha)
        where k.id in (select id from settled)
        on conflict (run_id, message_id) do nothing
        returning 1`,
    ]);
  }
  // Gone: every model's embeddings are orphans. Blank: the target's only.
  if (work.gone.length > 0) {
    parts.push([
      'orphans',
      sql`delete from message_embeddings
        where message_id = any(${ids(work.gone)}) and message_id in (select id from settled)
        returning 1`,
    ]);
  }
  if (work.blank.length > 0) {
    parts.push([
      'blanked',
      sql`delete from message_embeddings
        where ${target} and message_id = any(${ids(work.blank)})
          and message_id in (select id from settled)
        returning 1`,
    ]);
  }
  // Handled from a message that changed since (not settled), or not handled
  // at all: back in the queue at once. `message_id = any(ids)`, as in the
  // fence, probes the batch's own rows: without it, on statistics of a
  // queue filled by the run's own scan, PGlite ANDed the `claimed_by` index
  // (1,760 entries, live and dead) with the primary key's target prefix
  // (5,974), 2.6 of an 8-email commit's 3.9 ms at 16 in flight, to give
  // back nothing (BENCHMARKS.md, "eighth pass"). `not in (select …)` is one
  // hashed set: as a semi-join against an `unnest … union all`, PostgreSQL
  // ran the union again for each of a 64-row batch's rows, 0.74 ms.
  if (handled.length + work.released.length > 0) {
    parts.push([
      'returned',
      sql`update embedding_queue q set claimed_by = null, claimed_at = null
        where ${waitAtMost} not ${recorded} and ${heldByRun}
          and q.message_id = any(${ids([...handled, ...work.released])})
          and (q.message_id = any(${ids(work.released)})
               or q.message_id not in (select id from settled))
        returning 1`,
    ]);
  }
  // Failed for now: the attempt counted, and a backoff of 2^attempts
  // seconds, at most 5 minutes, before it is claimed again.
  if (work.deferred.length > 0) {
    parts.push([
      'deferred',
      sql`update embedding_queue q set claimed_by = null, claimed_at = null,
          attempts = q.attempts + 1, last_error = ${work.deferredError ?? 'retries exhausted'},
          not_before = now() + least(power(2, least(q.attempts, 9)) * interval '1 second',
                                     interval '5 minutes')
        where ${waitAtMost} not ${recorded} and ${heldByRun}
          and q.message_id = any(${ids(work.deferred)})
        returning 1`,
    ]);
  }
  if (batch) {
    const e = work.embedded;
    const s = work.skipped;
    const everyPart = sql.join(
      parts.map(([name]) => sql`(select count(*) from ${sql.ref(name)})`),
      sql` + `,
    );
    const lift = guarded ? sql`set_config('lock_timeout', '0', ${everyPart} >= 0)` : sql`null`;
    parts.push([
      'counts',
      sql`select count(*) filter (where d.skip = false)::int as embedded,
          count(*) filter (where d.skip)::int as skipped,
          count(*) filter (where d.truncated)::int as truncated,
          coalesce(sum(d.tokens) filter (where d.skip = false), 0)::int as tokens,
          ${lift} as lifted
        from unnest(${ids([...e.map((r) => r.messageId), ...s.map((r) => r.messageId)])},
          ${[...e.map(() => false), ...s.map(() => true)]}::bool[],
          ${[...e.map((r) => r.truncated), ...s.map(() => false)]}::bool[],
          ${[...e.map((r) => r.inputTokens), ...s.map(() => 0)]}::int[])
          as d(id, skip, truncated, tokens)
        where d.id in (select id from settled)`,
    ]);
    parts.push([
      'batch',
      sql`insert into embedding_batches (run_id, batch_no, first_message_id, last_message_id,
          size, embedded, skipped, tokens, attempts, latency_ms)
        select ${batch.runId}, ${batch.batchNo}, ${batch.firstMessageId}, ${batch.lastMessageId},
          c.embedded + c.skipped, c.embedded, c.skipped, c.tokens, ${batch.attempts},
          ${batch.latencyMs}
        from counts c where c.embedded + c.skipped > 0 and not ${recorded}
        returning run_id`,
    ]);
    parts.push([
      'run',
      sql`update embedding_runs r set
          embedded = r.embedded + c.embedded, skipped = r.skipped + c.skipped,
          truncated = r.truncated + c.truncated, tokens = r.tokens + c.tokens,
          requests = r.requests + ${batch.attempts}, retries = r.retries + ${batch.retries},
          batches = r.batches + 1, heartbeat_at = now()
        from batch b, counts c where r.id = b.run_id
        returning 1`,
    ]);
  }
  const ctes = sql.join(
    parts.map(([name, body]) => sql`${sql.ref(name)} as (${body})`),
    sql`, `,
  );
  const { rows } = await sql<{ recorded: boolean; ids: string[] }>`
    with ${ctes}
    select ${recorded} as recorded,
      coalesce((select array_agg(id::text) from settled), '{}') as ids
      ${batch ? sql`, (select count(*) from run) as runs` : sql``}`.execute(db);
  const answer = rows[0];
  return { recorded: answer?.recorded === true, ids: new Set(answer?.ids ?? []) };
}
