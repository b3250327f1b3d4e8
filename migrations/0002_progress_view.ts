import { type Kysely, sql } from 'kysely';

/**
 * One row per run for psql: `select * from embedding_progress where status = 'running';`
 * `planned` is counted when the run starts, so remaining, percent and ETA cost no
 * scan of messages. ETA assumes the run's average rate so far.
 */
export async function up(db: Kysely<unknown>): Promise<void> {
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
      r.started_at,
      r.finished_at,
      r.host,
      r.pid,
      r.error
    from embedding_runs r
  `.execute(db);
}

export async function down(db: Kysely<unknown>): Promise<void> {
  await sql`drop view if exists embedding_progress`.execute(db);
}
