import { type Kysely, sql } from 'kysely';
import { readIdType } from '../src/db/source.js';

/**
 * Continuous sync on one claim mechanism (see README, "How work is shared").
 *
 * Sweeps, ranges, range cursors and the run cursor are gone. In their place:
 * - `embedding_sources`: the one source this schema's embeddings belong to,
 *   and how its changes are captured (triggers, or reconciliation scans).
 * - `embedding_targets`: one row per (provider, model) that has ever run;
 *   the capture triggers enqueue a change for each, and `backfilled_at` null
 *   means its first run (or a `--reconcile`) scans the source.
 * - `embedding_queue`: one row per (target, message) whose embedding may be
 *   missing or stale. Workers claim rows with FOR UPDATE SKIP LOCKED, mark
 *   them with their run, and delete them in the batch's own transaction:
 *   that commit is the fence. A row claimed by a run that stopped beating is
 *   released for others.
 * Existing embeddings are kept: every (provider, model) that has any gets a
 * target that is not backfilled yet, so its next run finds what is missing.
 */
export async function up(db: Kysely<unknown>): Promise<void> {
  const idType = sql.raw(await readIdType(db));

  await sql`drop view if exists embedding_sweep_progress`.execute(db);
  await sql`drop view if exists embedding_progress`.execute(db);
  await sql`drop table if exists embedding_ranges`.execute(db);
  await sql`drop table if exists embedding_sweeps`.execute(db);
  await sql`alter table embedding_runs drop column if exists sweep_id,
    drop column if exists cursor_id,
    add column deferred integer not null default 0,
    add column watch boolean not null default false`.execute(db);

  await sql`
    create table embedding_sources (
      -- One source per schema: its ids key every embedding here.
      id integer primary key default 1 check (id = 1),
      relation text not null,
      id_column text not null,
      text_column text not null,
      capture text not null check (capture in ('triggers', 'reconcile')),
      -- The version of the capture functions installed (src/sql/capture.ts).
      capture_version integer not null default 0,
      registered_at timestamptz not null default now()
    )`.execute(db);

  await sql`
    create table embedding_targets (
      id integer primary key generated always as identity,
      provider text not null,
      model text not null,
      backfilled_at timestamptz,
      created_at timestamptz not null default now(),
      unique (provider, model)
    )`.execute(db);
  await sql`
    insert into embedding_targets (provider, model)
    select distinct provider, model from message_embeddings
    union select distinct provider, model from embedding_runs`.execute(db);

  await sql`
    create table embedding_queue (
      target_id integer not null references embedding_targets (id) on delete cascade,
      message_id ${idType} not null,
      -- The oldest change not yet embedded: the lag is now() minus the least of these.
      changed_at timestamptz not null default now(),
      -- Set after a transient failure: not claimed again before then (watch mode).
      not_before timestamptz,
      attempts integer not null default 0,
      last_error text,
      -- Re-embed even if an embedding of the current content exists (--force).
      force boolean not null default false,
      claimed_by bigint,
      claimed_at timestamptz,
      primary key (target_id, message_id)
    )`.execute(db);
  // The claim walks this in id order past rows others hold.
  await sql`create index embedding_queue_unclaimed
    on embedding_queue (target_id, message_id) where claimed_by is null`.execute(db);
  // The capture trigger's wake-up gate asks whether an older change is still
  // waiting; the oldest unclaimed change is the first entry here.
  await sql`create index embedding_queue_waiting
    on embedding_queue (target_id, changed_at) where claimed_by is null and not_before is null`.execute(
    db,
  );
  await sql`create index embedding_queue_claimed_by
    on embedding_queue (claimed_by) where claimed_by is not null`.execute(db);

  // A skip is remembered with the content it was made from, so a skipped
  // message is tried again only when its text changes (or --retry-skipped).
  await sql`alter table embedding_skips add column content_sha256 bytea`.execute(db);

  await progressView(db);
  await sql`
    create view embedding_queue_status as
    select
      t.provider,
      t.model,
      count(q.message_id)::int as pending,
      count(q.message_id) filter (where q.claimed_by is not null)::int as claimed,
      count(q.message_id) filter (where q.not_before > now())::int as backing_off,
      now() - min(q.changed_at) as lag,
      min(q.changed_at) as oldest_change_at,
      t.backfilled_at
    from embedding_targets t
    left join embedding_queue q on q.target_id = t.id
    group by t.id, t.provider, t.model, t.backfilled_at`.execute(db);
}

/** One row per run, for psql; the columns of 0004 without the sweep's. */
async function progressView(db: Kysely<unknown>): Promise<void> {
  await sql`
    create view embedding_progress as
    select
      r.id as run_id,
      r.provider,
      r.model,
      r.status,
      r.planned,
      r.embedded,
      r.skipped,
      r.truncated,
      greatest(r.planned - r.embedded - r.skipped, 0) as remaining,
      case when r.planned = 0 then 100.0
           else round(100.0 * (r.embedded + r.skipped) / r.planned, 1) end as percent,
      round(((r.embedded + r.skipped) /
        nullif(extract(epoch from coalesce(r.finished_at, now()) - r.started_at), 0))::numeric, 1)
        as messages_per_s,
      case when r.status = 'running' and not r.watch and r.embedded + r.skipped > 0
           then (now() - r.started_at)
                * (greatest(r.planned - r.embedded - r.skipped, 0)::float8 / (r.embedded + r.skipped))
      end as eta,
      r.tokens,
      r.requests,
      r.retries,
      r.heartbeat_at,
      now() - r.heartbeat_at as heartbeat_age,
      (select count(*) from embedding_queue q where q.claimed_by = r.id)::int as claimed,
      r.started_at,
      r.finished_at,
      r.host,
      r.pid,
      r.error,
      r.tokens_billed,
      r.requests_billed,
      r.deferred,
      r.watch
    from embedding_runs r
  `.execute(db);
}
