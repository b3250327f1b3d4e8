import { type Kysely, sql } from 'kysely';

/**
 * The fleet's rate budgets (--max-rpm, --max-tpm): one token bucket a row,
 * shared by every worker of the same provider, model and API key, so three
 * workers with --max-tpm 1000000 send 1,000,000 tokens a minute together,
 * not three million. `key` holds a fingerprint of the key, never the key
 * (src/provider/fingerprint.ts). Refilled on the database's clock.
 */
export async function up(db: Kysely<unknown>): Promise<void> {
  await sql`create table embedding_rate_limits (
    key text primary key,
    requests float8 not null,
    tokens float8 not null,
    refreshed_at timestamptz not null default now())`.execute(db);
}

export async function down(db: Kysely<unknown>): Promise<void> {
  await sql`drop table embedding_rate_limits`.execute(db);
}
