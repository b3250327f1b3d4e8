import { type Kysely, sql } from 'kysely';
import { readIdType } from '../src/db/source.js';
import { up as progressViewV2 } from './0002_progress_view.js';

/**
 * Work sharing between workers on one database (see README, "Several workers").
 *
 * A sweep is one pass over messages for a (provider, model): its ranges split
 * the id space so that each holds about --range-size eligible messages when
 * planned. A worker leases a range (FOR UPDATE SKIP LOCKED), walks it with its
 * own keyset cursor committed in each batch's transaction, renews the lease
 * while it works, and marks the range done. A lease that lapses (kill -9, a
 * lost machine) is taken over from the committed cursor.
 */
export async function up(db: Kysely<unknown>): Promise<void> {
  // The id type message_embeddings already has (0001 took it from the source).
  const idType = sql.raw(await readIdType(db));
  await db.schema
    .createTable('embedding_sweeps')
    .addColumn('id', 'bigint', (c) => c.primaryKey().generatedAlwaysAsIdentity())
    .addColumn('provider', 'text', (c) => c.notNull())
    .addColumn('model', 'text', (c) => c.notNull())
    // --force sweeps re-embed everything, so they are not shared with normal ones.
    .addColumn('force', 'boolean', (c) => c.notNull().defaultTo(false))
    .addColumn('planned', 'integer', (c) => c.notNull())
    .addColumn('ranges', 'integer', (c) => c.notNull())
    .addColumn('created_by_run', 'bigint')
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('finished_at', 'timestamptz')
    .execute();
  // At most one open sweep per target: workers that start together join it.
  await sql`create unique index embedding_sweeps_one_open
    on embedding_sweeps (provider, model, force) where finished_at is null`.execute(db);

  await db.schema
    .createTable('embedding_ranges')
    .addColumn('sweep_id', 'bigint', (c) =>
      c.notNull().references('embedding_sweeps.id').onDelete('cascade'),
    )
    .addColumn('range_no', 'integer', (c) => c.notNull())
    // (lo_id, hi_id]: null lo is the start of the table, null hi its end, so
    // the ranges cover every id, including ids inserted after planning.
    .addColumn('lo_id', idType)
    .addColumn('hi_id', idType)
    .addColumn('planned', 'integer', (c) => c.notNull())
    .addColumn('state', 'text', (c) =>
      c.notNull().defaultTo('pending').check(sql`state in ('pending', 'leased', 'done')`),
    )
    // Every eligible message in (lo_id, cursor_id] is handled; a taker resumes after it.
    .addColumn('cursor_id', idType)
    .addColumn('lease_owner', 'bigint')
    .addColumn('lease_expires_at', 'timestamptz')
    .addColumn('heartbeat_at', 'timestamptz')
    .addColumn('leases', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('takeovers', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('embedded', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('skipped', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('done_at', 'timestamptz')
    .addPrimaryKeyConstraint('embedding_ranges_pkey', ['sweep_id', 'range_no'])
    .execute();
  await db.schema
    .createIndex('embedding_ranges_owner_idx')
    .on('embedding_ranges')
    .column('lease_owner')
    .where(sql.ref('state'), '=', 'leased')
    .execute();

  // A run whose worker died (no heartbeat past its lease) is marked abandoned
  // by the worker that takes over its range, so psql never shows a ghost as running.
  await sql`alter table embedding_runs drop constraint embedding_runs_status_check`.execute(db);
  await sql`alter table embedding_runs add constraint embedding_runs_status_check
    check (status in ('running', 'succeeded', 'partial', 'failed', 'interrupted', 'abandoned'))`.execute(
    db,
  );
  await sql`alter table embedding_runs add column sweep_id bigint`.execute(db);

  // The progress view gains the run's sweep and its leases; the sweep view
  // shows the whole fleet's progress on one target.
  await sql`drop view embedding_progress`.execute(db);
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
      r.sweep_id,
      (select count(*) from embedding_ranges g
        where g.lease_owner = r.id and g.state = 'leased')::int as ranges_leased,
      (select min(g.lease_expires_at) from embedding_ranges g
        where g.lease_owner = r.id and g.state = 'leased') as lease_expires_at,
      r.started_at,
      r.finished_at,
      r.host,
      r.pid,
      r.error
    from embedding_runs r
  `.execute(db);

  await sql`
    create view embedding_sweep_progress as
    select
      s.id as sweep_id,
      s.provider,
      s.model,
      s.force,
      case when s.finished_at is null then 'open' else 'finished' end as status,
      s.ranges,
      count(*) filter (where g.state = 'done')::int as ranges_done,
      count(*) filter (where g.state = 'leased' and g.lease_expires_at >= now())::int as ranges_leased,
      count(*) filter (where g.state = 'leased' and g.lease_expires_at < now())::int as ranges_expired,
      count(*) filter (where g.state = 'pending')::int as ranges_pending,
      s.planned,
      coalesce(sum(g.embedded), 0)::int as embedded,
      coalesce(sum(g.skipped), 0)::int as skipped,
      case when s.planned = 0 then 100.0
           else round(100.0 * least(coalesce(sum(g.embedded + g.skipped), 0), s.planned) / s.planned, 1)
      end as percent,
      count(distinct g.lease_owner) filter (where g.state = 'leased')::int as workers,
      coalesce(sum(g.takeovers), 0)::int as takeovers,
      now() - max(g.heartbeat_at) filter (where g.state = 'leased') as newest_heartbeat_age,
      s.created_at,
      s.finished_at
    from embedding_sweeps s
    left join embedding_ranges g on g.sweep_id = s.id
    group by s.id
  `.execute(db);
}

export async function down(db: Kysely<unknown>): Promise<void> {
  await sql`drop view if exists embedding_sweep_progress`.execute(db);
  await sql`drop view if exists embedding_progress`.execute(db);
  await sql`drop table if exists embedding_ranges`.execute(db);
  await sql`drop table if exists embedding_sweeps`.execute(db);
  await sql`update embedding_runs set status = 'failed' where status = 'abandoned'`.execute(db);
  await sql`alter table embedding_runs drop column sweep_id`.execute(db);
  await sql`alter table embedding_runs drop constraint embedding_runs_status_check`.execute(db);
  await sql`alter table embedding_runs add constraint embedding_runs_status_check
    check (status in ('running', 'succeeded', 'partial', 'failed', 'interrupted'))`.execute(db);
  await progressViewV2(db);
}
