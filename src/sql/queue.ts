import { createHash } from 'node:crypto';
import { type Kysely, type RawBuilder, sql, type Transaction } from 'kysely';
import type { IdType, MessageSource } from '../db/names.js';
import type { DB } from '../db/schema.js';
import { duplicateIdError, quotedSource, sourceRelation } from '../db/source.js';

type Db = Kysely<DB> | Transaction<DB>;

/** Whose claims, on which target's queue: fixed for a run. */
export interface ClaimScope {
  targetId: number;
  runId: string;
  provider: string;
  model: string;
  source: MessageSource;
  /** The embeddings' id type: id lists are cast to it, so the primary key serves the lookups. */
  idType: IdType;
  /**
   * The database is one session (PGlite, in this process or served over its
   * socket; Database.oneSession): no transaction commits while one of this
   * run's statements runs. A claim then takes no row locks and reads the
   * messages in its own statement (RunDeps.oneSession), and a one-shot
   * run's scan claims for it as it queues (ClaimSink).
   */
  oneSession: boolean;
}

/** Ids (as text) as an array of the id type, for `= any(...)` on an indexed column. */
export function idArray(scope: Pick<ClaimScope, 'idType'>, ids: string[]) {
  return sql`${ids}::text[]::${sql.raw(scope.idType)}[]`;
}

export interface Target {
  id: number;
  provider: string;
  model: string;
  /** Null until a reconciliation scan has enqueued everything the triggers did not see. */
  backfilledAt: Date | null;
}

/**
 * The target row of (provider, model), made on its first run. A new target
 * is made with the source locked in SHARE mode (when its triggers capture
 * it): that waits for the writers in flight, whose triggers ran before the
 * target existed and queued nothing for it, to commit, so the first scan
 * that follows sees their rows; writers after it see the target.
 */
export async function ensureTarget(
  db: Kysely<DB>,
  provider: string,
  model: string,
  capturedTable?: MessageSource,
): Promise<Target> {
  await db.transaction().execute(async (trx) => {
    const { rows } = await sql<{ id: number }>`
      insert into embedding_targets (provider, model) values (${provider}, ${model})
      on conflict (provider, model) do nothing returning id`.execute(trx);
    if (rows.length > 0 && capturedTable) {
      await sql`lock table ${sql.raw(quotedSource(capturedTable))} in share mode`.execute(trx);
    }
  });
  const { rows } = await sql<Target>`
    select id, provider, model, backfilled_at as "backfilledAt" from embedding_targets
    where provider = ${provider} and model = ${model}`.execute(db);
  const target = rows[0];
  if (!target) throw new Error(`target ${provider}/${model} vanished`);
  return target;
}

/** A queue row this run claimed, with the message as it is now. */
export interface ClaimedMessage {
  id: string;
  /**
   * The queue row's version (its xmin) as of the message read here: the
   * fence settles the row only if it still is.
   */
  version: string;
  /** The message still exists. */
  exists: boolean;
  /** Null when the message is gone, or its text is NULL (then it is blank). */
  content: string | null;
  /** sha256 of the content as read, hex; null when the message is gone. */
  sha256Hex: string | null;
  /** Has a non-whitespace character: blank messages are never embedded. */
  nonBlank: boolean;
  /** An embedding of exactly this content exists for the target. */
  current: boolean;
  force: boolean;
}

export interface ClaimOptions {
  /** Keyset: only ids after this one (this run's last claim); null from the start. */
  after: string | null;
  limit: number;
  /** Claim rows in backoff too (a one-shot run retries what a watcher deferred). */
  ignoreBackoff: boolean;
}

/**
 * Claims the next `limit` pending messages in id order and reads them: how
 * a one-shot run works through a backfill. FOR UPDATE SKIP LOCKED (see
 * pickLock): workers claiming at once each get other rows without waiting.
 * The keyset (`message_id > after`, see ClaimKeyset) seeks past the index
 * entries of the rows this run has claimed and settled since the last
 * vacuum, so a backfill of a million rows never walks them claim after
 * claim.
 */
export async function claimBatch(
  db: Db,
  scope: ClaimScope,
  options: ClaimOptions,
): Promise<ClaimedMessage[]> {
  const after = options.after === null ? sql`` : sql`and q.message_id > ${options.after}`;
  const due = options.ignoreBackoff
    ? sql``
    : sql`and (q.not_before is null or q.not_before <= now())`;
  return claimAndRead(
    db,
    scope,
    sql`select q.target_id, q.message_id from embedding_queue q
      where q.target_id = ${scope.targetId} and q.claimed_by is null ${due} ${after}
      order by q.message_id
      limit ${options.limit}
      ${pickLock(scope)}`,
  );
}

/**
 * The row locks of a claim's pick: SKIP LOCKED passes over the rows that
 * another run's claim or commit holds. With one session (PGlite, or PGlite
 * served over its socket) no other transaction is ever open while a
 * statement runs (PGliteSession; the socket's server), so there
 * is nothing to pass over, and each lock is a write of its own (a WAL
 * record a row) before the claim's update: 0.6 ms of a 64-row claim's 3.0
 * there (BENCHMARKS.md, "sixth pass").
 */
function pickLock(scope: ClaimScope) {
  return scope.oneSession ? sql`` : sql`for update skip locked`;
}

/**
 * Claims the `limit` oldest changes and reads them: how a watcher follows a
 * stream. First in, first out by `changed_at` (the time of the first change
 * not yet embedded), so a message whose transaction committed after higher
 * ids (ids are taken before commit) is not left behind a backlog: in id
 * order under a steady 1,000 inserts a second, some waited 25 s, the whole
 * stream, with the worker never caught up. Rows whose backoff has run out
 * join by `not_before`. Each side reads its own partial index
 * (embedding_queue_waiting, embedding_queue_backing_off) from the start;
 * both are small in watch mode, and SKIP LOCKED passes what others hold.
 */
export async function claimOldest(
  db: Db,
  scope: ClaimScope,
  limit: number,
): Promise<ClaimedMessage[]> {
  return claimAndRead(
    db,
    scope,
    sql`select target_id, message_id from (
        select * from waiting union all select * from due_again) oldest
      order by changed_at limit ${limit}`,
    // FOR UPDATE is not allowed in a UNION's arms: each side locks in a CTE.
    sql`waiting as (
        select q.target_id, q.message_id, q.changed_at from embedding_queue q
        where q.target_id = ${scope.targetId} and q.claimed_by is null and q.not_before is null
        order by q.changed_at limit ${limit} ${pickLock(scope)}),
      due_again as (
        select q.target_id, q.message_id, q.changed_at from embedding_queue q
        where q.target_id = ${scope.targetId} and q.claimed_by is null and q.not_before <= now()
        order by q.not_before limit ${limit} ${pickLock(scope)}),`,
  );
}

/**
 * Marks the picked rows as this run's (`claimed_by`), then reads each
 * message, with its queue row's version, as they are now, in a statement of
 * its own: read in the claim's own statement, a message whose edit
 * committed while the claim waited for its row came from the claim's older
 * snapshot, while the row's version was already the edit's, and the fence
 * (which compares versions) would have settled the old text. Read after, in
 * one snapshot, the text and the version agree (an edit and its capture
 * trigger's update of the row commit together): an edit committed between
 * the two statements is read, and settles (with the claim's version it was
 * sent twice, 3 texts of ~400 in a watcher's test under a steady writer);
 * one after the read changes the version, and the fence leaves the row to
 * be embedded again. With one
 * session nothing commits during the claim, so it reads in the claim's own
 * statement: on PGlite the second statement took ~1 ms more of the engine's
 * thread a claim (BENCHMARKS.md, "fifth pass").
 *
 * Committed at once, so no transaction stays open across the HTTP request
 * (PGlite has one session; a pool would need a connection per batch in
 * flight). In id order, as the fence settles them.
 */
async function claimAndRead(
  db: Db,
  scope: ClaimScope,
  picked: RawBuilder<unknown>,
  /** CTEs `picked` reads from, each followed by a comma. */
  before: RawBuilder<unknown> = sql``,
): Promise<ClaimedMessage[]> {
  const claim = sql`
    with ${before} picked as (${picked}),
    claimed as (
      update embedding_queue q set claimed_by = ${scope.runId}, claimed_at = now()
      from picked p where q.target_id = p.target_id and q.message_id = p.message_id
      returning q.message_id, q.force, q.xmin::text as version)`;
  type Claimed = { id: string; force: boolean };
  if (scope.oneSession) {
    const { rows: read } = await sql<ReadClaim & Claimed>`${claim}
      select c.message_id::text as id, c.force, c.version, ${readColumns(scope, sql`c.message_id`)}
      from claimed c left join ${sourceRelation(scope.source)} m on m.id = c.message_id
      order by c.message_id`.execute(db);
    return claimedFromRead(scope, read, read);
  }
  const { rows: claimed } = await sql<Claimed>`${claim}
    select message_id::text as id, force from claimed
    order by message_id`.execute(db);
  if (claimed.length === 0) return [];
  // A row gone since (its message deleted) has no version: '0' matches none.
  const { rows: read } = await sql<ReadClaim>`
    select c.id::text as id, coalesce(q.xmin::text, '0') as version,
      ${readColumns(scope, sql`c.id`)}
    from unnest(${idArray(
      scope,
      claimed.map((c) => c.id),
    )}) as c(id)
    left join embedding_queue q on q.target_id = ${scope.targetId} and q.message_id = c.id
    left join ${sourceRelation(scope.source)} m on m.id = c.id
    order by c.id`.execute(db);
  return claimedFromRead(scope, read, claimed);
}

/**
 * Claimed messages as read, hashed and judged. `read` and `claims` (what was
 * claimed, with its force mark) are both in id order, one row an id. A view
 * may return an id twice: refused by name here, before a batch holding both
 * copies fails its upsert.
 */
export function claimedFromRead(
  scope: Pick<ClaimScope, 'source'>,
  read: ReadClaim[],
  claims: ReadonlyArray<{ id: string; force: boolean }>,
): ClaimedMessage[] {
  for (let i = 1; i < read.length; i++) {
    const id = (read[i] as ReadClaim).id;
    if (id === read[i - 1]?.id) {
      throw duplicateIdError(scope.source, id, read.filter((r) => r.id === id).length);
    }
  }
  // The content is hashed here, not in SQL: PGlite's sha256() in WebAssembly
  // was 3.6 ms of a 64-message claim's engine time, and the engine is the
  // busier thread; OpenSSL takes microseconds. UTF-8, as the scan's
  // convert_to(content, 'UTF8') hashes it (test/sql/queue.test.ts pins that).
  return claims.map(({ id, force }, i): ClaimedMessage => {
    const { exists, content, nonBlank, embeddedSha256, id: readId, version } = read[i] as ReadClaim;
    // A mismatch is a bug here, never a guess.
    if (readId !== id) throw new Error(`claim read ${readId} for ${id}`);
    const sha256Hex =
      content === null ? null : createHash('sha256').update(content, 'utf8').digest('hex');
    return {
      id,
      version,
      exists,
      content,
      sha256Hex,
      nonBlank,
      current: sha256Hex !== null && embeddedSha256 === sha256Hex,
      force,
    };
  });
}

/** A claimed message as read, before its content is hashed. */
export interface ReadClaim {
  id: string;
  /** The queue row's version, read with the message (ClaimedMessage.version). */
  version: string;
  exists: boolean;
  content: string | null;
  nonBlank: boolean;
  embeddedSha256: string | null;
}

/**
 * What a claim reads of each message `m` it claimed (`id`). Whether an
 * embedding of this content exists is a correlated subquery, so it stays
 * one primary-key probe a row whatever the statistics say: as a left join,
 * on a table analyzed while empty, the planner merged against every
 * embedding of the target, sorted (9 ms a claim at 10,000 embeddings,
 * growing with the table).
 */
function readColumns(scope: ClaimScope, id: RawBuilder<unknown>) {
  return sql`m.id is not null as exists, m.content,
      coalesce(m.content ~ '\\S', false) as "nonBlank",
      (select encode(e.content_sha256, 'hex') from message_embeddings e
        where e.provider = ${scope.provider} and e.model = ${scope.model}
          and e.message_id = ${id}) as "embeddedSha256"`;
}

/** Everything the run still holds, given back as it ends. */
export async function releaseRunClaims(db: Db, runId: string): Promise<number> {
  const result = await sql`
    update embedding_queue set claimed_by = null, claimed_at = null
    where claimed_by = ${runId}`.execute(db);
  return Number(result.numAffectedRows ?? 0);
}

/**
 * Releases the claims of runs that are no longer running (finished, or
 * marked abandoned for want of a heartbeat): their rows are claimable again.
 */
export async function releaseDeadClaims(db: Db): Promise<number> {
  const result = await sql`
    update embedding_queue q set claimed_by = null, claimed_at = null
    where q.claimed_by is not null
      and not exists (select 1 from embedding_runs r
                      where r.id = q.claimed_by and r.status = 'running')`.execute(db);
  return Number(result.numAffectedRows ?? 0);
}

export interface QueueState {
  /** Rows no one holds that are due now. */
  due: number;
  /** Rows held by other runs (live ones: dead runs' claims are released first). */
  claimedByOthers: number;
  /** Rows waiting out a backoff. */
  backingOff: number;
}

/** What is left in the target's queue, for a run deciding whether it is done. */
export async function queueState(db: Db, targetId: number, runId: string): Promise<QueueState> {
  const { rows } = await sql<QueueState>`
    select
      count(*) filter (where claimed_by is null
                       and (not_before is null or not_before <= now()))::int as due,
      count(*) filter (where claimed_by is not null and claimed_by <> ${runId})::int
        as "claimedByOthers",
      count(*) filter (where claimed_by is null and not_before > now())::int as "backingOff"
    from embedding_queue where target_id = ${targetId}`.execute(db);
  return rows[0] ?? { due: 0, claimedByOthers: 0, backingOff: 0 };
}

/**
 * Makes the target's deferred rows due now: an explicit run retries them at
 * once. Not the rows another run holds: any update gives a row a new
 * version, and that run's fence would then leave it to be sent again.
 */
export async function clearBackoff(db: Db, targetId: number): Promise<void> {
  await sql`update embedding_queue set not_before = null
            where target_id = ${targetId} and not_before is not null
              and claimed_by is null`.execute(db);
}

/**
 * A target's queue depth (claimed rows included: not embedded yet) and the
 * age of its oldest change, for the metrics at each scrape, as the
 * embedding_queue_status view defines them (its grouping by provider and
 * model lets the filter reach the one target's rows). By provider and model,
 * so it answers before the worker has made its target.
 */
export async function queueFigures(
  db: Db,
  target: { provider: string; model: string },
): Promise<{ pending: number; lagSeconds: number }> {
  const { rows } = await sql<{ pending: number; lagSeconds: number }>`
    select pending, coalesce(extract(epoch from lag), 0)::float8 as "lagSeconds"
    from embedding_queue_status
    where provider = ${target.provider} and model = ${target.model}`.execute(db);
  return rows[0] ?? { pending: 0, lagSeconds: 0 };
}

/** Queue rows of the target no one holds: what a run starting now would take on. */
export async function pendingCount(db: Db, targetId: number): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    select count(*)::int as n from embedding_queue
    where target_id = ${targetId} and claimed_by is null`.execute(db);
  return rows[0]?.n ?? 0;
}

/**
 * The queue's rows as the statistics system counts them (`n_live_tup`): a
 * catalog read, where count(*) reads the queue. A backend's counts reach
 * it within 1-10 s of its commit, soon enough to notice an application's
 * bulk load through the triggers.
 */
export async function queueRowsLive(db: Db): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    select n_live_tup::float8 as n from pg_stat_user_tables
    where relid = to_regclass('embedding_queue')`.execute(db);
  return rows[0]?.n ?? 0;
}

/**
 * ANALYZEs the queue when its statistics are far behind what it holds: right
 * after a bulk load (a first scan, or an application's million inserts
 * through the triggers) the planner believes the queue nearly empty, and
 * plans the id-order claim as a bitmap scan of every pending row and a sort:
 * 88 ms a claim over 500,000 queued rows, against 0.2 ms by the index once
 * analyzed (PostgreSQL 15). Autovacuum would catch up within a minute or so;
 * a backfill's first claims need it now. A sample of 30,000 rows: before a
 * run's first claims, after its scan's chunks, and at a heartbeat that finds
 * the queue grown that far since (queueRowsLive). True when it analyzed.
 */
export async function analyzeQueueIfStale(
  db: Db,
  pending: number,
  minRows = 10_000,
): Promise<boolean> {
  if (pending < minRows) return false;
  // reltuples is -1 (PostgreSQL 14+) or 0 before the first ANALYZE.
  const { rows } = await sql<{ estimate: number }>`
    select reltuples::float8 as estimate from pg_class
    where oid = to_regclass('embedding_queue')`.execute(db);
  if ((rows[0]?.estimate ?? 0) >= pending / 2) return false;
  await sql`analyze embedding_queue`.execute(db);
  return true;
}

/**
 * Messages whose latest skip for the target was of their current content,
 * and that have no embedding of it: still un-embedded by choice of an
 * earlier --allow-partial run. Not retried by themselves (their text has not
 * changed), but never forgotten either: a run that leaves them is partial.
 */
function outstandingSkips(scope: ClaimScope) {
  return sql`
    select s.message_id from (
      select distinct on (message_id) message_id, content_sha256 from embedding_skips
      where provider = ${scope.provider} and model = ${scope.model}
      order by message_id, created_at desc) s
    join ${sourceRelation(scope.source)} m on m.id = s.message_id
      and sha256(convert_to(m.content, 'UTF8')) = s.content_sha256
    where not exists (select 1 from message_embeddings e
                      where e.provider = ${scope.provider} and e.model = ${scope.model}
                        and e.message_id = s.message_id and e.content_sha256 = s.content_sha256)`;
}

/** How many messages earlier runs skipped that are still as they were. */
export async function countOutstandingSkips(db: Db, scope: ClaimScope): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    select count(*)::int as n from (${outstandingSkips(scope)}) o`.execute(db);
  return rows[0]?.n ?? 0;
}

/**
 * Queues the messages earlier runs skipped, unchanged since (--retry-skipped,
 * and every strict run: strict mode stops on a message it cannot embed, even
 * one an earlier run skipped). O(skips), not O(table).
 */
export async function enqueueSkipped(db: Db, scope: ClaimScope): Promise<number> {
  const result = await sql`
    insert into embedding_queue (target_id, message_id)
    select ${scope.targetId}, o.message_id from (${outstandingSkips(scope)}) o
    on conflict (target_id, message_id) do nothing`.execute(db);
  return Number(result.numAffectedRows ?? 0);
}
