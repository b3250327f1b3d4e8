import { type Kysely, sql } from 'kysely';
import type { EmbeddingColumnType } from '../db/embedding-column.js';
import type { DB } from '../db/schema.js';
import { type MessageSource, sourceRelation } from '../db/source.js';
import { vectorLiteral } from '../db/vector.js';

export interface SearchHit {
  messageId: string;
  /** Cosine similarity, 1 for the same direction. */
  similarity: number;
  content: string;
}

/**
 * The k messages nearest the query by cosine, for one (provider, model).
 * pgvector's `<=>` where the column is vector or halfvec (an HNSW index on
 * the same expression serves it, see README); on real[] a plain SQL
 * cosine over every row of the model, which is exact and fine for tens of
 * thousands of rows.
 */
export async function nearestMessages(
  db: Kysely<DB>,
  target: {
    provider: string;
    model: string;
    columnType: EmbeddingColumnType;
    source: MessageSource;
  },
  query: Float32Array,
  k: number,
): Promise<SearchHit[]> {
  const literal = vectorLiteral(query, target.columnType);
  const distance =
    target.columnType === 'real[]'
      ? sql`1 - (select sum(a * b) / nullif(sqrt(sum(a * a)) * sqrt(sum(b * b)), 0)
                 from unnest(e.embedding, ${literal}::real[]) as t(a, b))`
      : sql`e.embedding <=> ${literal}::${sql.raw(target.columnType)}`;
  const { rows } = await sql<SearchHit>`
    select e.message_id::text as "messageId", (1 - (${distance}))::float8 as similarity,
      m.content
    from message_embeddings e join ${sourceRelation(target.source)} m on m.id = e.message_id
    where e.provider = ${target.provider} and e.model = ${target.model}
      and e.dimensions = ${query.length}
    order by ${distance}
    limit ${k}`.execute(db);
  return rows;
}

/** How many embeddings the target has, to tell "no results" from "nothing embedded yet". */
export async function countEmbeddings(
  db: Kysely<DB>,
  target: { provider: string; model: string },
): Promise<number> {
  const row = await db
    .selectFrom('message_embeddings')
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('provider', '=', target.provider)
    .where('model', '=', target.model)
    .executeTakeFirstOrThrow();
  return Number(row.n);
}
