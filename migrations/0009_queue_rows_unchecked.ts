import { type Kysely, sql } from 'kysely';

/**
 * A queue row no longer checks its target row as it is written (the foreign
 * key to embedding_targets): the check is a lookup of its own for every
 * row, on every write of the application through the capture triggers and
 * every row a scan queues. 100,000 rows took 1.21-1.23 s to queue with it
 * and 0.70-0.71 s without (PostgreSQL 15), and 6,000 took 140-156 ms against
 * 54-56 on PGlite (BENCHMARKS.md, "eighth pass").
 *
 * pgembed queues rows only for targets that exist and never deletes one.
 * A target deleted by hand still takes its queue rows with it, as the
 * key's ON DELETE CASCADE did: a trigger that runs once per DELETE
 * statement, not once per row written.
 */
export async function up(db: Kysely<unknown>): Promise<void> {
  await sql`alter table embedding_queue drop constraint embedding_queue_target_id_fkey`.execute(db);
  await sql`create function pgembed_targets_deleted() returns trigger language plpgsql as $$
    begin
      delete from embedding_queue q using gone g where q.target_id = g.id;
      return null;
    end $$`.execute(db);
  await sql`create trigger pgembed_targets_deleted after delete on embedding_targets
    referencing old table as gone
    for each statement execute function pgembed_targets_deleted()`.execute(db);
}

export async function down(db: Kysely<unknown>): Promise<void> {
  await sql`drop trigger pgembed_targets_deleted on embedding_targets`.execute(db);
  await sql`drop function pgembed_targets_deleted()`.execute(db);
  await sql`delete from embedding_queue q
    where not exists (select 1 from embedding_targets t where t.id = q.target_id)`.execute(db);
  await sql`alter table embedding_queue add constraint embedding_queue_target_id_fkey
    foreign key (target_id) references embedding_targets (id) on delete cascade`.execute(db);
}
