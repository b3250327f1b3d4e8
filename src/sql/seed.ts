import { type Kysely, sql } from 'kysely';
import type { DB } from '../db/schema.js';
import type { SeedMessage } from '../seed/sources.js';

/**
 * Inserts messages, keyed by id: re-seeding adds no duplicates, and changes a
 * row only when its content differs (so unchanged messages keep their
 * embeddings' hashes valid). Returns how many rows were inserted or changed.
 */
export async function upsertMessages(db: Kysely<DB>, rows: SeedMessage[]): Promise<number> {
  if (rows.length === 0) return 0;
  const result = await db
    .insertInto('messages')
    .values(
      rows.map((r) => ({
        id: r.id,
        content: r.content,
        role: r.role ?? null,
        conversation_id: r.conversation_id ?? null,
      })),
    )
    .onConflict((oc) =>
      oc
        .column('id')
        .doUpdateSet((eb) => ({ content: eb.ref('excluded.content'), updated_at: sql`now()` }))
        .where(sql<boolean>`messages.content is distinct from excluded.content`),
    )
    .executeTakeFirst();
  return Number(result.numInsertedOrUpdatedRows ?? 0);
}
