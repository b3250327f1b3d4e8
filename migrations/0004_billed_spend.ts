import { type Kysely, sql } from 'kysely';

/**
 * What a run was billed, beside what it kept. `tokens` and `requests` grow
 * only when a batch commits, so answers paid for and then thrown away (a
 * strict-mode stop, a lost lease, a stop signal, a failed commit) were
 * missing from them. `tokens_billed` and `requests_billed` count every
 * request the provider answered, kept or not; the worker writes them with
 * its heartbeat and at the end of the run.
 */
export async function up(db: Kysely<unknown>): Promise<void> {
  await sql`alter table embedding_runs
    add column tokens_billed bigint not null default 0,
    add column requests_billed integer not null default 0`.execute(db);
  // The progress view shows both; the new columns go last, so a view or
  // query built on the old one keeps working (create or replace keeps the rest).
  await progressView(db, { billed: true });
}

export async function down(db: Kysely<unknown>): Promise<void> {
  // Fewer columns: create or replace cannot drop them, so the view is rebuilt.
  await sql`drop view embedding_progress`.execute(db);
  await progressView(db, { billed: false });
  await sql`alter table embedding_runs
    drop column tokens_billed,
    drop column requests_billed`.execute(db);
}

/** The progress view of 0003, with the billed columns appended when asked. */
async function progressView(db: Kysely<unknown>, options: { billed: boolean }): Promise<void> {
  const billed = options.billed
    ? sql`,
      r.tokens_billed,
      r.requests_billed`
    : sql``;
  await sql`
    create or replace view embedding_progress as
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
      case when r.status = 'running' and r.embedded + r.skipped > 0
           then (now() - r.started_at)
                * (greatest(r.planned - r.embedded - r.skipped, 0)::float8 / (r.embedded + r.skipped))
      end as eta,
      r.tokens,
      r.requests,
      r.retries,
      r.cursor_id,
      r.heartbeat_at,
      now() - r.heartbeat_at as heartbeat_age,
      r.sweep_id,
      (select count(*) from embedding_ranges g
        where g.lease_owner = r.id and g.state = 'leased')::int as ranges_leased,
      (select min(g.lease_expires_at) from embedding_ranges g
        where g.lease_owner = r.id and g.state = 'leased') as lease_expires_at,
      r.started_at,
      r.finished_at,
      r.host,
      r.pid,
      r.error${billed}
    from embedding_runs r
  `.execute(db);
}
