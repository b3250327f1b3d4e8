import { type Kysely, sql } from 'kysely';

/**
 * Watchers claim the oldest change first (queue.ts, claimOldest): pending
 * rows by `changed_at` through embedding_queue_waiting, and rows whose
 * backoff has run out by `not_before` through this one. Partial, so it holds
 * only the few rows backing off, and a claim of due rows never reads the
 * rest of a backlog.
 */
export async function up(db: Kysely<unknown>): Promise<void> {
  await sql`create index embedding_queue_backing_off
    on embedding_queue (target_id, not_before)
    where claimed_by is null and not_before is not null`.execute(db);
}

export async function down(db: Kysely<unknown>): Promise<void> {
  await sql`drop index embedding_queue_backing_off`.execute(db);
}
