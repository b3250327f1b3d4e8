import { type Kysely, sql } from 'kysely';

/**
 * Vectors that fit in a page are stored in the row, uncompressed. A
 * 1,536-dimension vector is ~6 KB, over the default 2 KB TOAST target, so
 * each insert ran pglz over float bits that do not compress, then wrote the
 * value out of line as four TOAST chunks with four index entries. Measured
 * on PostgreSQL 15 (20,000 rows, 64 a statement): the upsert took 22 ms a
 * statement with TOAST and 10 ms with the target at a page.
 *
 * The table's target, not the column's storage (pgai sets STORAGE MAIN):
 * MAIN still tries compression first, and PLAIN fails an insert whose row
 * does not fit a page (3,072 dimensions). Rows over 8,160 bytes are still
 * compressed and moved out of line as before. Rows written before this
 * migration keep their TOAST until rewritten (VACUUM FULL).
 */
export async function up(db: Kysely<unknown>): Promise<void> {
  await sql`alter table message_embeddings set (toast_tuple_target = 8160)`.execute(db);
}

export async function down(db: Kysely<unknown>): Promise<void> {
  await sql`alter table message_embeddings reset (toast_tuple_target)`.execute(db);
}
