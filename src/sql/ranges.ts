import { type ExpressionBuilder, type Kysely, sql, type Transaction } from 'kysely';
import type { DB } from '../db/schema.js';
import { type EmbeddingTarget, eligibleTiles } from './messages.js';

export interface Sweep {
  id: string;
  planned: number;
  ranges: number;
  /** True when this run planned it; false when it joined one in progress. */
  created: boolean;
  /**
   * Joined with ranges already walked, done or part-way: messages behind
   * those cursors may change unseen by this run, so it makes one more pass
   * over a new sweep before it may say everything is embedded.
   */
  progressedBeforeJoin: boolean;
}

export interface LeasedRange {
  sweepId: string;
  rangeNo: number;
  loId: string | null;
  hiId: string | null;
  /** Where this lease resumes: the committed cursor, else the range's start. */
  cursorId: string | null;
  /** The run whose lapsed lease this one took over, if any. */
  takenFrom: string | null;
}

export interface RangeKey {
  sweepId: string;
  rangeNo: number;
  runId: string;
}

const RANGE_INSERT_CHUNK = 1000;

/** The range, as long as `range.runId` holds it: every write of a lease holder is fenced so. */
function heldBy(range: RangeKey) {
  return (eb: ExpressionBuilder<DB, 'embedding_ranges'>) =>
    eb.and([
      eb('sweep_id', '=', range.sweepId),
      eb('range_no', '=', range.rangeNo),
      eb('lease_owner', '=', range.runId),
    ]);
}

function leaseInterval(leaseMs: number) {
  return sql`${leaseMs} * interval '1 millisecond'`;
}

/**
 * Joins the open sweep for the target, or plans one. An advisory lock per
 * target serialises planners, so workers that start together plan once and
 * share; the partial unique index on open sweeps is the guarantee behind it.
 */
export async function openSweep(
  db: Kysely<DB>,
  target: EmbeddingTarget,
  options: { rangeSize: number; runId: string },
): Promise<Sweep> {
  return db.transaction().execute(async (trx) => {
    const key = `pgembed sweep ${target.provider} ${target.model} ${target.force}`;
    await sql`select pg_advisory_xact_lock(hashtextextended(${key}, 0))`.execute(trx);
    const open = await trx
      .selectFrom('embedding_sweeps')
      .select(['id', 'planned', 'ranges'])
      .where('provider', '=', target.provider)
      .where('model', '=', target.model)
      .where('force', '=', target.force)
      .where('finished_at', 'is', null)
      .executeTakeFirst();
    if (open) {
      const { rows } = await sql<{ progressed: boolean }>`
        select exists (select 1 from embedding_ranges where sweep_id = ${open.id}
                       and (state = 'done' or cursor_id is distinct from lo_id)) as progressed`.execute(
        trx,
      );
      return {
        ...open,
        id: String(open.id),
        created: false,
        progressedBeforeJoin: rows[0]?.progressed === true,
      };
    }

    const tiles = await eligibleTiles(trx, target, options.rangeSize);
    const planned = tiles.reduce((sum, t) => sum + t.eligible, 0);
    const sweep = await trx
      .insertInto('embedding_sweeps')
      .values({
        provider: target.provider,
        model: target.model,
        force: target.force,
        planned,
        ranges: Math.max(tiles.length, 1),
        created_by_run: options.runId,
      })
      .returning('id')
      .executeTakeFirstOrThrow();
    const sweepId = String(sweep.id);
    // Contiguous (lo, hi] ranges over the whole id space: the first starts at
    // the beginning, the last has no end, so no id falls between ranges.
    const ranges =
      tiles.length === 0
        ? [{ lo_id: null, hi_id: null, planned: 0 }]
        : tiles.map((tile, i) => ({
            lo_id: i === 0 ? null : (tiles[i - 1]?.hiId ?? null),
            hi_id: i === tiles.length - 1 ? null : tile.hiId,
            planned: tile.eligible,
          }));
    for (let i = 0; i < ranges.length; i += RANGE_INSERT_CHUNK) {
      await trx
        .insertInto('embedding_ranges')
        .values(
          ranges
            .slice(i, i + RANGE_INSERT_CHUNK)
            .map((r, j) => ({ sweep_id: sweepId, range_no: i + j, ...r })),
        )
        .execute();
    }
    return {
      id: sweepId,
      planned,
      ranges: ranges.length,
      created: true,
      progressedBeforeJoin: false,
    };
  });
}

/**
 * Leases the first range nobody holds: pending, or leased with a lapsed
 * lease. FOR UPDATE SKIP LOCKED: workers claiming at once each get a different
 * range without waiting on each other. A takeover also marks the dead run
 * abandoned when its heartbeat is older than the lease.
 */
export async function claimRange(
  db: Kysely<DB>,
  options: {
    sweepId: string;
    runId: string;
    leaseMs: number;
    /** Ranges this run is walking now, never handed out to it again. */
    walking?: number[];
  },
): Promise<LeasedRange | undefined> {
  const walking = sql`array[${sql.join([-1, ...(options.walking ?? [])])}]::int[]`;
  return db.transaction().execute(async (trx) => {
    const { rows } = await sql<{
      rangeNo: number;
      loId: string | null;
      hiId: string | null;
      cursorId: string | null;
      previousState: string;
      previousOwner: string | null;
    }>`
      with candidate as (
        select sweep_id, range_no, state as previous_state, lease_owner as previous_owner
        from embedding_ranges
        where sweep_id = ${options.sweepId}
          and (state = 'pending'
               or (state = 'leased' and lease_expires_at < now())
               -- leased to this run but not walked: a claim whose answer was
               -- lost with the connection, redone
               or (state = 'leased' and lease_owner = ${options.runId}))
          and not (lease_owner is not distinct from ${options.runId} and range_no = any(${walking}))
        order by range_no
        limit 1
        for update skip locked
      )
      update embedding_ranges g set
        state = 'leased',
        lease_owner = ${options.runId},
        lease_expires_at = now() + ${leaseInterval(options.leaseMs)},
        heartbeat_at = now(),
        leases = g.leases + 1,
        takeovers = g.takeovers
          + (c.previous_state = 'leased' and c.previous_owner <> ${options.runId})::int
      from candidate c
      where g.sweep_id = c.sweep_id and g.range_no = c.range_no
      returning g.range_no as "rangeNo", g.lo_id::text as "loId", g.hi_id::text as "hiId",
        g.cursor_id::text as "cursorId", c.previous_state as "previousState",
        c.previous_owner::text as "previousOwner"`.execute(trx);
    const row = rows[0];
    if (!row) return undefined;
    const takenFrom = row.previousState === 'leased' ? row.previousOwner : null;
    if (takenFrom !== null && takenFrom !== options.runId) {
      await sql`
        update embedding_runs set status = 'abandoned', finished_at = now(),
          error = 'no heartbeat for longer than the lease; its ranges were taken over'
        where id = ${takenFrom} and status = 'running'
          and heartbeat_at < now() - ${leaseInterval(options.leaseMs)}`.execute(trx);
    }
    return {
      sweepId: options.sweepId,
      rangeNo: row.rangeNo,
      loId: row.loId,
      hiId: row.hiId,
      cursorId: row.cursorId ?? row.loId,
      takenFrom,
    };
  });
}

/**
 * Moves a range's cursor and counts in the batch's transaction, renewing the
 * lease. False when the lease is no longer this run's (it lapsed and another
 * worker took the range): the caller must roll the batch back.
 */
export async function advanceRange(
  trx: Transaction<DB>,
  range: RangeKey,
  change: { cursorId: string | null; embedded: number; skipped: number; leaseMs: number },
): Promise<boolean> {
  const result = await trx
    .updateTable('embedding_ranges')
    .set((eb) => ({
      // greatest(): batches commit out of order; greatest ignores a null.
      cursor_id: sql`greatest(cursor_id, ${change.cursorId})`,
      embedded: eb('embedded', '+', change.embedded),
      skipped: eb('skipped', '+', change.skipped),
      lease_expires_at: sql`now() + ${leaseInterval(change.leaseMs)}`,
      heartbeat_at: sql`now()`,
    }))
    .where(heldBy(range))
    .where('state', '=', 'leased')
    .executeTakeFirst();
  return Number(result.numUpdatedRows) === 1;
}

/**
 * Renews every lease the run still holds and says which: a range missing
 * from the answer was taken over while this worker stalled.
 */
export async function renewLeases(
  db: Kysely<DB>,
  runId: string,
  leaseMs: number,
): Promise<Array<{ sweepId: string; rangeNo: number }>> {
  const rows = await db
    .updateTable('embedding_ranges')
    .set({ lease_expires_at: sql`now() + ${leaseInterval(leaseMs)}`, heartbeat_at: sql`now()` })
    .where('lease_owner', '=', runId)
    .where('state', '=', 'leased')
    .returning(['sweep_id', 'range_no'])
    .execute();
  return rows.map((r) => ({ sweepId: String(r.sweep_id), rangeNo: r.range_no }));
}

/**
 * Marks a walked range done, and its sweep finished when it was the last.
 * The sweep row is locked first: two workers finishing the last two ranges
 * at once would otherwise each see the other's range still open.
 */
export async function finishRange(
  db: Kysely<DB>,
  range: RangeKey,
  cursorId: string | null,
): Promise<boolean> {
  return db.transaction().execute(async (trx) => {
    await sql`select 1 from embedding_sweeps where id = ${range.sweepId} for update`.execute(trx);
    const result = await trx
      .updateTable('embedding_ranges')
      .set({
        state: 'done',
        done_at: sql`now()`,
        cursor_id: sql`greatest(cursor_id, ${cursorId})`,
        lease_expires_at: null,
      })
      .where(heldBy(range))
      // 'done' too: a redo after a COMMIT whose answer was lost finds it done.
      .where('state', 'in', ['leased', 'done'])
      .executeTakeFirst();
    await closeSweepIfDone(trx, range.sweepId);
    return Number(result.numUpdatedRows) === 1;
  });
}

/** Idempotent: finishes the sweep once every range is done. */
export async function closeSweepIfDone(
  db: Kysely<DB> | Transaction<DB>,
  sweepId: string,
): Promise<void> {
  await sql`
    update embedding_sweeps set finished_at = now()
    where id = ${sweepId} and finished_at is null
      and not exists (select 1 from embedding_ranges
                      where sweep_id = ${sweepId} and state <> 'done')`.execute(db);
}

/**
 * Hands a range back (stop, --limit, failure): pending at once, so another
 * worker takes it without waiting for the lease to lapse.
 */
export async function releaseRange(
  db: Kysely<DB>,
  range: RangeKey,
  cursorId: string | null,
): Promise<void> {
  await db
    .updateTable('embedding_ranges')
    .set({
      state: 'pending',
      lease_owner: null,
      lease_expires_at: null,
      cursor_id: sql`greatest(cursor_id, ${cursorId})`,
    })
    .where(heldBy(range))
    .where('state', '=', 'leased')
    .execute();
}

export interface SweepState {
  total: number;
  done: number;
  /** Leased by other runs, lease still valid. */
  heldByOthers: number;
  /** Pending or lapsed. */
  claimable: number;
}

/** What is left of a sweep, for a worker with nothing to claim deciding whether to wait. */
export async function sweepState(
  db: Kysely<DB>,
  sweepId: string,
  runId: string,
): Promise<SweepState> {
  const { rows } = await sql<SweepState>`
    select count(*)::int as total,
      count(*) filter (where state = 'done')::int as done,
      count(*) filter (where state = 'leased' and lease_owner <> ${runId}
                       and lease_expires_at >= now())::int as "heldByOthers",
      count(*) filter (where state = 'pending'
                       or (state = 'leased' and lease_expires_at < now()))::int as claimable
    from embedding_ranges where sweep_id = ${sweepId}`.execute(db);
  return rows[0] ?? { total: 0, done: 0, heldByOthers: 0, claimable: 0 };
}
