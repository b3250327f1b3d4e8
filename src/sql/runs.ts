import { hostname } from 'node:os';
import { type Kysely, type RawBuilder, sql } from 'kysely';
import type { DB, RunStatus } from '../db/schema.js';
import { redactSecrets, redactValues } from '../redact.js';

export async function insertRun(
  db: Kysely<DB>,
  run: {
    provider: string;
    model: string;
    options: Record<string, unknown>;
    planned: number;
    blank: number;
    watch: boolean;
  },
): Promise<string> {
  const row = await db
    .insertInto('embedding_runs')
    .values({
      provider: run.provider,
      model: run.model,
      status: 'running',
      options: JSON.stringify(redactValues(run.options)),
      host: hostname(),
      pid: process.pid,
      planned: run.planned,
      ineligible_blank: run.blank,
      watch: run.watch,
    })
    .returning('id')
    .executeTakeFirstOrThrow();
  return String(row.id);
}

/**
 * Marks runs abandoned whose heartbeat is older than their own lease (a
 * killed worker cannot say it ended), so psql never shows a ghost as running.
 * A run that was only slow sets its real status when it finishes.
 */
export async function markAbandonedRuns(db: Kysely<DB>): Promise<number> {
  const result = await sql`
    update embedding_runs set status = 'abandoned', finished_at = now(),
      error = 'no heartbeat for longer than its lease: the worker died'
    where status = 'running'
      and heartbeat_at < now() - coalesce((options->>'lease_ms')::int, 30000) * interval '1 millisecond'`.execute(
    db,
  );
  return Number(result.numAffectedRows ?? 0);
}

/** What a one-shot run set out to do, once its queue is ready. */
export async function setPlanned(
  db: Kysely<DB>,
  runId: string,
  planned: number,
  blank: number,
): Promise<void> {
  await db
    .updateTable('embedding_runs')
    .set({ planned, ineligible_blank: blank })
    .where('id', '=', runId)
    .execute();
}

/** What the provider has answered so far, kept or not: written with the heartbeat and at the end. */
export interface BilledSpend {
  tokensBilled: number;
  requestsBilled: number;
  /** Messages given back after a transient failure (retries exhausted). */
  deferred?: number;
  /** A watcher's planned grows with every claim. */
  planned?: number;
}

/**
 * Heartbeat between batches, so psql can tell a slow run from a dead one, with
 * the spend billed so far. greatest(): a late heartbeat never lowers it.
 */
export async function touchRun(db: Kysely<DB>, runId: string, billed?: BilledSpend): Promise<void> {
  await db
    .updateTable('embedding_runs')
    .set({
      heartbeat_at: sql`now()`,
      ...(billed ? billedColumns(billed) : {}),
    })
    .where('id', '=', runId)
    .execute();
}

/**
 * A run marked abandoned while it stalled (no heartbeat for --lease-ms) that
 * beats again is running again: its claims were released to others, and its
 * commits since found nothing of theirs to write. Without this, others
 * would release every claim it makes from now on. True if it was revived.
 */
export async function reviveRun(db: Kysely<DB>, runId: string): Promise<boolean> {
  const result = await db
    .updateTable('embedding_runs')
    .set({ status: 'running', finished_at: null, error: null })
    .where('id', '=', runId)
    .where('status', '=', 'abandoned')
    .executeTakeFirst();
  return Number(result.numUpdatedRows) > 0;
}

function billedColumns(billed: BilledSpend) {
  return {
    tokens_billed: sql<number>`greatest(tokens_billed, ${billed.tokensBilled})`,
    requests_billed: sql<number>`greatest(requests_billed, ${billed.requestsBilled})`,
    ...(billed.deferred === undefined
      ? {}
      : { deferred: sql<number>`greatest(deferred, ${billed.deferred})` }),
    ...(billed.planned === undefined
      ? {}
      : { planned: sql<number>`greatest(planned, ${billed.planned})` }),
  };
}

export async function finishRun(
  db: Kysely<DB>,
  runId: string,
  status: Exclude<RunStatus, 'running'>,
  summary: Record<string, unknown>,
  error: string | null,
  billed?: BilledSpend,
): Promise<void> {
  await db
    .updateTable('embedding_runs')
    .set({
      status,
      finished_at: sql`now()`,
      heartbeat_at: sql`now()`,
      ...(billed ? billedColumns(billed) : {}),
      // The last stop before psql: URLs and known secrets in the error
      // (an SDK or driver message quoting a URL) are redacted here.
      summary: JSON.stringify(redactValues(summary)),
      error: error === null ? null : redactSecrets(error),
    })
    .where('id', '=', runId)
    .execute();
}

/** Skipped ids by reason, for the summary and the manifest; read once at the end. */
export async function skipsByReason(
  db: Kysely<DB>,
  runId: string,
): Promise<Record<string, string[]>> {
  const rows = await db
    .selectFrom('embedding_skips')
    .select(['reason', sql<string>`message_id::text`.as('id')])
    .where('run_id', '=', runId)
    .orderBy('message_id')
    .execute();
  const out: Record<string, string[]> = {};
  for (const row of rows) {
    out[row.reason] ??= [];
    out[row.reason]?.push(row.id);
  }
  return out;
}

/**
 * Tokens billed today (UTC) by the model's other runs, as their rows say
 * (a running one's lags by up to a heartbeat): a watcher's daily budget
 * counts the whole fleet's spend. A run counts on the day it started.
 */
export async function billedTodayByOthers(
  db: Kysely<DB>,
  target: { provider: string; model: string; runId: string },
): Promise<number> {
  const { rows } = await sql<{ n: string }>`
    select coalesce(sum(tokens_billed), 0)::text as n from embedding_runs
    where provider = ${target.provider} and model = ${target.model} and id <> ${target.runId}
      and ${startedTodayUtc(sql.ref('started_at'))}`.execute(db);
  return Number(rows[0]?.n ?? 0);
}

/** A run's day, for a watcher's daily budget: the UTC day it started on. */
export function startedTodayUtc(startedAt: RawBuilder<unknown>) {
  return sql`${startedAt} >= date_trunc('day', now() at time zone 'UTC') at time zone 'UTC'`;
}
