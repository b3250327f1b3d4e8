import { hostname } from 'node:os';
import { type Kysely, sql } from 'kysely';
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

/** Which sweep the run works on, for the progress view. */
export async function setRunSweep(db: Kysely<DB>, runId: string, sweepId: string): Promise<void> {
  await db
    .updateTable('embedding_runs')
    .set({ sweep_id: sweepId })
    .where('id', '=', runId)
    .execute();
}

/** Heartbeat between batches, so psql can tell a slow run from a dead one. */
export async function touchRun(db: Kysely<DB>, runId: string): Promise<void> {
  await db
    .updateTable('embedding_runs')
    .set({ heartbeat_at: sql`now()` })
    .where('id', '=', runId)
    .execute();
}

export async function finishRun(
  db: Kysely<DB>,
  runId: string,
  status: Exclude<RunStatus, 'running'>,
  summary: Record<string, unknown>,
  error: string | null,
  cursorId: string | null,
): Promise<void> {
  await db
    .updateTable('embedding_runs')
    .set({
      status,
      cursor_id: sql`greatest(cursor_id, ${cursorId})`,
      finished_at: sql`now()`,
      heartbeat_at: sql`now()`,
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
