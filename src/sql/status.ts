import { type Kysely, sql } from 'kysely';
import type { MessageSource } from '../db/names.js';
import type { DB } from '../db/schema.js';
import { sourceRelation } from '../db/source.js';
import { startedTodayUtc } from './runs.js';

export interface RunStatusRow {
  runId: string;
  provider: string;
  model: string;
  status: string;
  planned: number;
  embedded: number;
  skipped: number;
  percent: number;
  messagesPerSecond: number | null;
  /** Seconds to go at the run's rate so far; running runs only. */
  etaSeconds: number | null;
  heartbeatAgeSeconds: number;
  startedAt: string;
  finishedAt: string | null;
  host: string;
  error: string | null;
  skippedByReason: Record<string, number>;
}

export interface CoverageRow {
  provider: string;
  model: string;
  /** Non-blank messages: what every model should cover. */
  eligible: number;
  /** Embedded from the message's current content. */
  upToDate: number;
  /** Embedded from content that has changed since. */
  stale: number;
  /** Eligible messages with no embedding at all for this model. */
  missing: number;
  /** Embeddings of messages that no longer exist (a --reconcile run removes them). */
  orphans: number;
}

export interface BudgetRow {
  provider: string;
  model: string;
  /** The latest run of the model that set a spend budget. */
  runId: string;
  /** A watcher's budget is the UTC day's, every run of the model counted. */
  perDay: boolean;
  budgetTokens: number;
  /** Billed against it: by the run, or today by every run of the model. */
  spentTokens: number;
}

/** The latest runs, as the progress view shows them, with their skips by reason. */
export async function latestRuns(db: Kysely<DB>, limit: number): Promise<RunStatusRow[]> {
  const { rows } = await sql<Omit<RunStatusRow, 'skippedByReason'>>`
    select run_id::text as "runId", provider, model, status, planned, embedded, skipped,
      percent::float8 as percent, messages_per_s::float8 as "messagesPerSecond",
      round(extract(epoch from eta))::int as "etaSeconds",
      round(extract(epoch from heartbeat_age))::int as "heartbeatAgeSeconds",
      started_at::text as "startedAt", finished_at::text as "finishedAt", host, error
    from embedding_progress
    order by run_id desc
    limit ${limit}`.execute(db);
  if (rows.length === 0) return [];
  const skips = await sql<{ runId: string; reason: string; n: number }>`
    select run_id::text as "runId", reason, count(*)::int as n from embedding_skips
    where run_id in (${sql.join(rows.map((r) => r.runId))})
    group by 1, 2`.execute(db);
  return rows.map((row) => ({
    ...row,
    skippedByReason: Object.fromEntries(
      skips.rows.filter((s) => s.runId === row.runId).map((s) => [s.reason, s.n]),
    ),
  }));
}

/**
 * Per (provider, model): how much of the table its embeddings cover. One
 * scan of messages hashing each content, as a run's census does.
 */
export async function coverage(db: Kysely<DB>, source: MessageSource): Promise<CoverageRow[]> {
  const { rows } = await sql<CoverageRow>`
    with eligible as (select count(*)::int as n from ${sourceRelation(source)} m
                      where m.content ~ '\\S'),
    per_model as (
      select e.provider, e.model,
        count(*) filter (where m.content ~ '\\S'
          and e.content_sha256 = sha256(convert_to(m.content, 'UTF8')))::int as up_to_date,
        count(*) filter (where m.content ~ '\\S'
          and e.content_sha256 <> sha256(convert_to(m.content, 'UTF8')))::int as stale,
        count(*) filter (where m.id is null)::int as orphans
      from message_embeddings e left join ${sourceRelation(source)} m on m.id = e.message_id
      group by 1, 2)
    select p.provider, p.model, eligible.n as eligible, p.up_to_date as "upToDate", p.stale,
      greatest(eligible.n - p.up_to_date - p.stale, 0) as missing, p.orphans
    from per_model p, eligible
    order by p.provider, p.model`.execute(db);
  return rows;
}

export interface QueueRow {
  provider: string;
  model: string;
  /** Messages waiting to be embedded (or found unchanged, or gone). */
  pending: number;
  /** Of those, held by a worker now. */
  claimed: number;
  /** Of those, waiting out a backoff after a transient failure. */
  backingOff: number;
  /** Age of the oldest pending change, in seconds; null when nothing is pending. */
  lagSeconds: number | null;
  /** The last transient failure still pending, if any. */
  lastError: string | null;
  /** False until a reconciliation scan has run for this model. */
  backfilled: boolean;
}

/** Per (provider, model): the queue's depth and lag, as embedding_queue_status shows them. */
export async function queueDepth(db: Kysely<DB>): Promise<QueueRow[]> {
  const { rows } = await sql<QueueRow>`
    select s.provider, s.model, s.pending, s.claimed, s.backing_off as "backingOff",
      round(extract(epoch from s.lag))::int as "lagSeconds",
      (select q.last_error from embedding_queue q join embedding_targets t on t.id = q.target_id
       where t.provider = s.provider and t.model = s.model and q.last_error is not null
       order by q.changed_at desc limit 1) as "lastError",
      s.backfilled_at is not null as backfilled
    from embedding_queue_status s order by s.provider, s.model`.execute(db);
  return rows;
}

/**
 * Per (provider, model), the latest run that set a spend budget, and what
 * is billed against it: the run's own, or for a watcher the UTC day's by
 * every run of the model (as the worker counts it; src/worker/budget.ts).
 */
export async function budgets(db: Kysely<DB>): Promise<BudgetRow[]> {
  const { rows } = await sql<BudgetRow>`
    select distinct on (r.provider, r.model) r.provider, r.model, r.id::text as "runId",
      r.watch as "perDay", (r.options->>'budget_tokens')::float8 as "budgetTokens",
      (case when r.watch then
        (select coalesce(sum(o.tokens_billed), 0) from embedding_runs o
         where o.provider = r.provider and o.model = r.model
           and ${startedTodayUtc(sql.ref('o.started_at'))})
       else r.tokens_billed end)::float8 as "spentTokens"
    from embedding_runs r
    where jsonb_typeof(r.options->'budget_tokens') = 'number'
    order by r.provider, r.model, r.id desc`.execute(db);
  return rows;
}
