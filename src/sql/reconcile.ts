import { type Kysely, type QueryResult, type RawBuilder, sql } from 'kysely';
import type { DB } from '../db/schema.js';
import { sourceRelation } from '../db/source.js';
import { type ClaimedMessage, type ClaimScope, claimedFromRead, type ReadClaim } from './queue.js';

export interface ReconcileCounts {
  /** Messages read. */
  scanned: number;
  /** Put in the queue: missing, stale (or every non-blank one, forced). */
  enqueued: number;
  blank: number;
  upToDate: number;
  /** Skipped before with the same content, and not asked to retry. */
  skippedBefore: number;
  /** Embeddings (any model) of ids the source no longer has. */
  orphansDeleted: number;
}

export interface ReconcileOptions {
  /** Enqueue every non-blank message, current or not (--force). */
  force: boolean;
  /** Enqueue messages skipped before with their current content too (--retry-skipped). */
  retrySkipped: boolean;
  /**
   * Messages per chunk, fixed; each chunk is one statement (after a read of
   * its end) and its own transaction. Default: sized by time (ChunkSizer).
   */
  chunkSize?: number;
  /** After each chunk has committed; false stops the scan early (a stop signal). */
  onChunk?: (counts: ReconcileCounts) => boolean | Promise<boolean>;
  /** The run beside the scan takes what the scan finds to send (ClaimSink). */
  claims?: ClaimSink;
}

/**
 * A run that takes its scan's finds as they are found (ScanHandoff): each
 * chunk queues what it wants already claimed by the run (scope.runId), and
 * hands the messages over as the chunk read them. The run then neither
 * claims nor reads them again: on PGlite that claim was 2.85 ms of the
 * engine a 64-message batch, and the first claims of a run waited behind
 * the scan's chunks (BENCHMARKS.md, "ninth pass"). A row already queued
 * (by a trigger, an earlier scan, or another worker's scan) is left as it
 * is, for the queue's claims.
 *
 * Only where the database is one session (ClaimScope.oneSession): nothing
 * commits while the chunk runs, so what it read is current when it claims.
 * On a server another worker may embed a message after the chunk's
 * snapshot and before its claim; trusted, the chunk's read made 3 workers
 * sharing 6,000 messages send some twice. Read again after the claim (as a
 * claim reads), the handoff measured no gain there: 16 in flight as before,
 * and short messages 0.35–0.54 of the write path against 0.47–0.48.
 */
export interface ClaimSink {
  /** How many messages the run takes now: the next chunk reads at most that many ids; 0 queues it unclaimed. */
  room(): number;
  /** A chunk's claims, in id order, once its statement has committed. */
  put(claimed: ClaimedMessage[]): void;
}

/**
 * How many ids the next chunk takes. The scan runs beside the run's claims
 * and commits (BackgroundScan), and on PGlite each chunk's statement holds
 * the one session while it runs: 5,000 emails took ~250 ms there, long
 * enough to leave 16 requests of 200 ms waiting for their claims and
 * commits. So the first chunk is small (the first claims wait for it), and
 * each next one is sized from the last one's time to take about 50 ms, at
 * most 5,000 ids (~30 ms of 1 M short messages on PostgreSQL 15, so a
 * statement never holds locks or a snapshot for long) and at least 500.
 */
export class ChunkSizer {
  static readonly FIRST = 500;
  static readonly MIN = 500;
  static readonly MAX = 5000;
  static readonly TARGET_MS = 50;
  #size = ChunkSizer.FIRST;

  get size(): number {
    return this.#size;
  }

  /** Takes in how long a chunk took: of the current size, or of `size` ids where fewer were read. */
  took(elapsedMs: number, size = this.#size): void {
    // At most 4× bigger at a time: one quick chunk (a range of short or
    // blank messages) does not make the next one huge.
    const scaled = (size * ChunkSizer.TARGET_MS) / Math.max(elapsedMs, 1);
    this.#size = Math.round(
      Math.min(ChunkSizer.MAX, Math.max(ChunkSizer.MIN, Math.min(scaled, 4 * this.#size))),
    );
  }
}

/**
 * A chunk's claims as its statement read them (ids in order). What they
 * share is not sent on each row: each exists (it was just read), none has
 * an embedding of its content (it would not have been wanted), and none is
 * forced (a forced scan runs before the claims, and never claims).
 */
function claimedFromScan(
  scope: ClaimScope,
  rows: ReadonlyArray<Partial<ReadClaim>>,
): ClaimedMessage[] {
  const read = rows.map(
    (r): ReadClaim => ({
      id: r.id as string,
      version: r.version as string,
      content: r.content ?? null,
      nonBlank: r.nonBlank === true,
      exists: true,
      embeddedSha256: null,
    }),
  );
  return claimedFromRead(
    scope,
    read,
    read.map((r) => ({ id: r.id, force: false })),
  );
}

/**
 * The reconciliation scan: walks the source by keyset, enqueueing for the
 * target every message with no embedding of its current content, and
 * deleting embeddings whose message is gone. For sources without triggers
 * (a view, --no-triggers, rows that arrive by logical replication, where
 * triggers do not fire), for a target's first run, and for --reconcile.
 *
 * Each chunk is an id range: its upper end is found first (the `size`th id
 * past the last chunk's end, by keyset and a limit; none for the last chunk,
 * which reaches past the source's last id), then one statement reads the
 * range and judges, enqueues and deletes within it.
 * The bounds are parameters, so the planner sees a small range: the chunk
 * is materialised and each id looked up in the embeddings' primary key,
 * whatever the statistics say (right after a bulk load they are stale, and
 * a plan that hashes the whole embeddings table per chunk would make the
 * scan O(n²)); and the orphans are found per model by a range scan of that
 * key, not a scan of every model's embeddings per chunk.
 */
export async function reconcile(
  db: Kysely<DB>,
  scope: ClaimScope,
  options: ReconcileOptions,
): Promise<ReconcileCounts> {
  const total: ReconcileCounts = {
    scanned: 0,
    enqueued: 0,
    blank: 0,
    upToDate: 0,
    skippedBefore: 0,
    orphansDeleted: 0,
  };
  const sizer = options.chunkSize === undefined ? new ChunkSizer() : undefined;
  const idType = sql.raw(scope.idType);
  const source = sourceRelation(scope.source);
  // Every (provider, model) with embeddings, for the orphans' range scans:
  // one probe of the primary key per model (a loose index scan). A model
  // first embedded while this scan runs has its orphans left to the next.
  const { rows: models } = await sql<{ provider: string; model: string }>`
    with recursive pm (provider, model) as (
      (select provider, model from message_embeddings order by provider, model limit 1)
      union all
      select n.provider, n.model from pm cross join lateral (
        select e.provider, e.model from message_embeddings e
        where (e.provider, e.model) > (pm.provider, pm.model)
        order by e.provider, e.model limit 1) n)
    select provider, model from pm`.execute(db);
  const providers = models.map((m) => m.provider);
  const modelNames = models.map((m) => m.model);

  let after: string | null = null;
  // Of the ids the last chunk read, the share it wanted: nearly all on a
  // model's first run, few on a rerun. A claiming chunk reads about as many
  // ids as fill the run's room, never more than the sizer's.
  let wantedShare = 1;
  if (options.claims && !scope.oneSession) {
    throw new Error('a scan claims for its run only where the database is one session');
  }
  for (;;) {
    const room = options.claims?.room() ?? 0;
    const claiming = room > 0;
    const size = Math.min(
      sizer?.size ?? (options.chunkSize as number),
      claiming ? Math.ceil(room / Math.max(wantedShare, 0.01)) : Infinity,
    );
    const startedAt = performance.now();
    const afterId = (column: RawBuilder<unknown>) =>
      after === null ? sql`true` : sql`${column} > ${after}::${idType}`;
    // The chunk's last id, by keyset and limit (never OFFSET); none when
    // fewer than `size` are left: the last chunk has no upper bound.
    const { rows: ends }: QueryResult<{ upper: string; n: number }> = await sql<{
      upper: string;
      n: number;
    }>`
      select t.id::text as upper, t.n::int as n from (
        select m.id, row_number() over (order by m.id) as n from ${source} m
        where ${afterId(sql`m.id`)} order by m.id limit ${size}) t
      order by t.n desc limit 1`.execute(db);
    const upper = ends[0] && ends[0].n >= size ? ends[0].upper : null;
    const upTo = (column: RawBuilder<unknown>) =>
      upper === null ? sql`true` : sql`${column} <= ${upper}::${idType}`;
    // Whether `table` holds a row of the target in the chunk's id range (ids
    // are bigint or uuid: no collation, so the range is the chunk's in every table).
    const anyIn = (table: RawBuilder<unknown>) =>
      sql`exists (select 1 from ${table} x
        where x.provider = ${scope.provider} and x.model = ${scope.model}
          and ${afterId(sql`x.message_id`)} and ${upTo(sql`x.message_id`)})`;
    // The first `room` wanted ids are claimed; any past them (the share
    // guessed low) are queued for the run's claims from the queue.
    const mine = sql`w.n <= ${room}`;
    const claimedBy = claiming
      ? sql`case when ${mine} then ${scope.runId}::bigint end, case when ${mine} then now() end`
      : sql`null, null`;
    const judge = sql<ReconcileCounts & Partial<ReadClaim>>`
      -- Neither test reads a whole text that it need not: blank is decided on
      -- the first 64 characters unless they are all whitespace (a TOASTed
      -- text is decompressed only that far), and the hash is computed only
      -- for a message with an embedding or a skip to compare it with. On a
      -- model's first scan that is none: 5,000 emails took 116 ms to read
      -- and hash in full, 20 ms so (PostgreSQL 15).
      with chunk as materialized (
        select m.id, m.content,
               case when left(m.content, 64) ~ '\\S' then true
                    else coalesce(m.content ~ '\\S', false) end as non_blank
        from ${source} m where ${afterId(sql`m.id`)} and ${upTo(sql`m.id`)}),
      -- offset 0 keeps each EXISTS a correlated primary-key probe: on stale
      -- statistics ("29 rows") Postgres hashed the whole model's embeddings
      -- per chunk instead, 2.8 s a chunk, 515 s over 1 M messages. Each kind
      -- is first probed once over the chunk's id range (present): where the
      -- target has none there (a model's first scan, which runs ahead of its commits),
      -- no message needs its own three probes.
      present as materialized (
        select ${anyIn(sql`message_embeddings`)} as embeddings,
          ${anyIn(sql`embedding_skips`)} as skips),
      judged as materialized (
        select c.id, c.non_blank,
          case when (select embeddings from present) then
            exists (select 1 from message_embeddings e
                    where e.provider = ${scope.provider} and e.model = ${scope.model}
                      and e.message_id = c.id
                      and e.content_sha256 = sha256(convert_to(c.content, 'UTF8')) offset 0)
          else false end as current,
          case when (select embeddings from present) then
            exists (select 1 from message_embeddings e
                    where e.provider = ${scope.provider} and e.model = ${scope.model}
                      and e.message_id = c.id offset 0)
          else false end as embedded,
          case when (select skips from present) then
            exists (select 1 from embedding_skips s
                    where s.provider = ${scope.provider} and s.model = ${scope.model}
                      and s.message_id = c.id
                      and s.content_sha256 = sha256(convert_to(c.content, 'UTF8')) offset 0)
          else false end as skipped
        from chunk c),
      wanted as (
        select j.id from judged j
        where (j.non_blank and (${options.force} or not j.current)
               and (${options.force} or ${options.retrySkipped} or not j.skipped))
          -- blank now, with an embedding of an earlier text: the claim removes it
          or (not j.non_blank and j.embedded)),
      -- A row already queued is left as it is, unless it is to be forced:
      -- any update gives it a new version, and a run holding it (a second
      -- worker's scan runs beside the first's claims) would find it changed
      -- at its fence and send it again.
      enqueued as (
        insert into embedding_queue as q (target_id, message_id, force, claimed_by, claimed_at)
        select ${scope.targetId}, w.id, ${options.force}, ${claimedBy}
        from (select id, row_number() over (order by id) as n from wanted) w
        on conflict (target_id, message_id) do update set force = true
          where excluded.force and not q.force
        returning q.message_id, q.xmin::text as version, q.claimed_by),
      orphans as (
        delete from message_embeddings e
        using unnest(${providers}::text[], ${modelNames}::text[]) as pm (provider, model)
        where e.provider = pm.provider and e.model = pm.model
          and ${afterId(sql`e.message_id`)} and ${upTo(sql`e.message_id`)}
          -- Looked up in the source's own id index, not in the chunk: an
          -- anti-join against the CTE, planned as a nested loop on stale
          -- statistics (message_embeddings "1 row" after a bulk load), read
          -- the whole chunk per embedding: 86 s for 5,000 emails on PG15.
          and not exists (select 1 from ${source} m where m.id = e.message_id)
        returning 1),
      counts as (select (select count(*)::int from chunk) as scanned,
        (select count(*)::int from wanted) as enqueued,
        (select count(*)::int from judged where not non_blank) as blank,
        (select count(*)::int from judged where non_blank and current) as "upToDate",
        (select count(*)::int from judged where non_blank and not current and skipped) as "skippedBefore",
        (select count(*)::int from orphans) as "orphansDeleted")
      ${
        claiming
          ? // The counts on a first row of their own, then each message
            // claimed as it was read: the counts and the constants on every
            // row made 13 columns that PGlite's thread parsed and posted for
            // each message (BENCHMARKS.md, "tenth pass"); what every claimed
            // row shares is set in claimedFromScan.
            sql`select u.scanned, u.enqueued, u.blank, u."upToDate", u."skippedBefore",
                  u."orphansDeleted", u.id, u.version, u.content, u."nonBlank"
                from (
                  select n.*, null::${idType} as at, null::text as id, null::text as version,
                    null::text as content, null::bool as "nonBlank"
                  from counts n
                  union all
                  select null, null, null, null, null, null, e.message_id, e.message_id::text,
                    e.version, k.content, k.non_blank
                  from enqueued e join chunk k on k.id = e.message_id
                  where e.claimed_by = ${scope.runId}) u
                order by u.at nulls first`
          : sql`select * from counts`
      }`;
    // Set for this statement alone. JIT off: on stale statistics the
    // estimate passes jit_above_cost, and compiling took ~9 of the 29 s
    // EXPLAIN ANALYZE spent over 1 M messages, for a statement that runs in
    // ~0.1 s. Sequential scans off: right after a bulk load of the source,
    // before its first ANALYZE, PostgreSQL 15 put 76,013 of 500,000 messages
    // in a chunk's range of 5,000 and read each chunk by a scan of the whole
    // table, 51-62 of a chunk's 132-136 ms (BENCHMARKS.md, "tenth pass").
    // Every read here has an index to take; a source without one on its id
    // still gets its scan, as the setting only prices it out where another
    // path exists.
    const result: QueryResult<ReconcileCounts & Partial<ReadClaim>> = await db
      .transaction()
      .execute(async (trx) => {
        await sql`select set_config('jit', 'off', true), set_config('enable_seqscan', 'off', true)`.execute(
          trx,
        );
        return judge.execute(trx);
      });
    sizer?.took(performance.now() - startedAt, size);
    if (claiming && options.claims)
      options.claims.put(claimedFromScan(scope, result.rows.slice(1)));
    const chunk = result.rows[0];
    if (chunk) {
      if (chunk.scanned > 0) wantedShare = chunk.enqueued / chunk.scanned;
      total.scanned += chunk.scanned;
      total.enqueued += chunk.enqueued;
      total.blank += chunk.blank;
      total.upToDate += chunk.upToDate;
      total.skippedBefore += options.retrySkipped || options.force ? 0 : chunk.skippedBefore;
      total.orphansDeleted += chunk.orphansDeleted;
    }
    if (options.onChunk && !(await options.onChunk(total))) return total;
    if (upper === null) break;
    after = upper;
  }
  await sql`update embedding_targets set backfilled_at = now()
            where id = ${scope.targetId}`.execute(db);
  return total;
}
