import { type Kysely, type RawBuilder, sql } from 'kysely';
import type { EmbeddingColumnType, MessageSource } from '../db/names.js';
import type { DB } from '../db/schema.js';
import { sourceRelation } from '../db/source.js';
import { vectorLiteral } from '../db/vector.js';

export interface SearchHit {
  messageId: string;
  /** Cosine similarity, 1 for the same direction. */
  similarity: number;
  content: string;
}

export interface SearchTarget {
  provider: string;
  model: string;
  columnType: EmbeddingColumnType;
  source: MessageSource;
}

/** pgvector's HNSW limits: `vector` up to 2,000 dimensions, `halfvec` up to 4,000. */
export const HNSW_MAX_VECTOR_DIMENSIONS = 2000;
export const HNSW_MAX_HALFVEC_DIMENSIONS = 4000;

/**
 * What search orders by, and what `pgembed index` indexes: the column cast to
 * one model's dimension, `embedding::vector(N)` (or `halfvec(N)` above 2,000
 * dimensions, or on a halfvec column). The two must be the same expression
 * for the index to serve the search, so both take it from here.
 */
export interface OrderCast {
  type: 'vector' | 'halfvec';
  dimensions: number;
  /** False when HNSW cannot index this cast; `why` says so in words. */
  indexable: boolean;
  why?: string;
}

export function orderCast(
  columnType: 'vector' | 'halfvec',
  dimensions: number,
  halfvecAvailable: boolean,
): OrderCast {
  if (columnType === 'halfvec' || dimensions <= HNSW_MAX_VECTOR_DIMENSIONS) {
    const type = columnType === 'halfvec' ? 'halfvec' : 'vector';
    const max = type === 'halfvec' ? HNSW_MAX_HALFVEC_DIMENSIONS : HNSW_MAX_VECTOR_DIMENSIONS;
    return dimensions <= max
      ? { type, dimensions, indexable: true }
      : {
          type,
          dimensions,
          indexable: false,
          why: `pgvector's HNSW indexes ${type} of at most ${max.toLocaleString('en-US')} dimensions`,
        };
  }
  if (dimensions > HNSW_MAX_HALFVEC_DIMENSIONS) {
    // Beyond any HNSW index: order by the exact vector.
    return {
      type: 'vector',
      dimensions,
      indexable: false,
      why: `pgvector's HNSW indexes at most ${HNSW_MAX_HALFVEC_DIMENSIONS.toLocaleString('en-US')} dimensions (as halfvec)`,
    };
  }
  if (!halfvecAvailable) {
    return {
      type: 'vector',
      dimensions,
      indexable: false,
      why: `pgvector's HNSW indexes vector of at most ${HNSW_MAX_VECTOR_DIMENSIONS.toLocaleString('en-US')} dimensions, and this server's pgvector has no halfvec (0.7 or later has)`,
    };
  }
  return { type: 'halfvec', dimensions, indexable: true };
}

/** True when pgvector's halfvec type exists (pgvector 0.7 and later). */
export async function halfvecAvailable<T>(db: Kysely<T>): Promise<boolean> {
  const { rows } = await sql<{ ok: boolean }>`
    select to_regtype('halfvec') is not null as ok`.execute(db);
  return rows[0]?.ok === true;
}

/**
 * The cast for a search of `dimensions`: asks the server about halfvec only
 * when it matters (a vector column, 2,001 to 4,000 dimensions).
 */
export async function orderCastFor<T>(
  db: Kysely<T>,
  columnType: 'vector' | 'halfvec',
  dimensions: number,
): Promise<OrderCast> {
  const needsHalfvec =
    columnType === 'vector' &&
    dimensions > HNSW_MAX_VECTOR_DIMENSIONS &&
    dimensions <= HNSW_MAX_HALFVEC_DIMENSIONS;
  return orderCast(columnType, dimensions, needsHalfvec ? await halfvecAvailable(db) : true);
}

/**
 * A text value as an SQL literal, for statements that cannot take parameters
 * (an index's `where`) and for the search's own `where`, which must match that
 * predicate whatever the server's plan cache does with parameters. An E''
 * string: the same under any standard_conforming_strings.
 */
export function textLiteral(value: string): RawBuilder<unknown> {
  return sql.raw(`E'${value.replaceAll('\\', '\\\\').replaceAll("'", "''")}'`);
}

/** `provider = … and model = … and dimensions = N`, as constants: the index's predicate. */
export function modelPredicate(
  target: { provider: string; model: string },
  dimensions: number,
  alias?: string,
): RawBuilder<unknown> {
  const col = (name: string) => sql.raw(alias ? `${alias}.${name}` : name);
  if (!Number.isSafeInteger(dimensions) || dimensions < 1) {
    throw new Error(`bad dimension ${dimensions}`);
  }
  return sql`${col('provider')} = ${textLiteral(target.provider)} and ${col('model')} = ${textLiteral(target.model)} and ${col('dimensions')} = ${sql.raw(String(dimensions))}`;
}

/** `embedding::vector(N)` or `embedding::halfvec(N)`. */
export function castExpression(cast: OrderCast, alias?: string): RawBuilder<unknown> {
  return sql.raw(`${alias ? `${alias}.` : ''}embedding::${cast.type}(${cast.dimensions})`);
}

/**
 * The search statement: the k messages nearest the query by cosine, for one
 * (provider, model) at the query's dimension. On vector/halfvec columns it
 * orders by `embedding::vector(N) <=> $q::vector(N)` (halfvec(N) above 2,000
 * dimensions) under `provider = … and model = … and dimensions = N`, which is
 * what `pgembed index` indexes, so an HNSW index serves it; the similarity
 * shown is computed on the stored vectors, exactly. On real[] a plain SQL
 * cosine over every row of the model, exact and fine for tens of thousands
 * of rows. Exported so tests can EXPLAIN it.
 */
export function searchStatement(
  target: SearchTarget,
  cast: OrderCast | undefined,
  query: Float32Array,
  k: number,
): RawBuilder<SearchHit> {
  const literal = vectorLiteral(query, target.columnType);
  let order: RawBuilder<unknown>;
  let similarity: RawBuilder<unknown>;
  if (target.columnType === 'real[]' || !cast) {
    const distance = sql`1 - (select sum(a * b) / nullif(sqrt(sum(a * a)) * sqrt(sum(b * b)), 0)
                 from unnest(e.embedding, ${literal}::real[]) as t(a, b))`;
    order = distance;
    similarity = sql`1 - (${distance})`;
  } else {
    order = sql`${castExpression(cast, 'e')} <=> ${literal}::${sql.raw(`${cast.type}(${cast.dimensions})`)}`;
    similarity = sql`1 - (e.embedding <=> ${literal}::${sql.raw(target.columnType)})`;
  }
  return sql<SearchHit>`
    select e.message_id::text as "messageId", (${similarity})::float8 as similarity, m.content
    from message_embeddings e join ${sourceRelation(target.source)} m on m.id = e.message_id
    where ${modelPredicate(target, query.length, 'e')}
    order by ${order}
    limit ${k}`;
}

/** HNSW's candidate list is `hnsw.ef_search` long (40 by default, at most 1,000): k needs as many. */
export function efSearchFor(k: number): number {
  return Math.min(Math.max(k, 40), 1000);
}

/**
 * The k messages nearest the query by cosine, for one (provider, model), among
 * its embeddings of the query's dimension (see searchStatement). On pgvector
 * columns it runs with `hnsw.ef_search` of at least k, so an index scan
 * returns k rows, not 40.
 */
export async function nearestMessages(
  db: Kysely<DB>,
  target: SearchTarget,
  query: Float32Array,
  k: number,
): Promise<SearchHit[]> {
  if (target.columnType === 'real[]') {
    return (await searchStatement(target, undefined, query, k).execute(db)).rows;
  }
  const cast = await orderCastFor(db, target.columnType, query.length);
  return db.transaction().execute(async (tx) => {
    await sql`set local hnsw.ef_search = ${sql.raw(String(efSearchFor(k)))}`.execute(tx);
    return (await searchStatement(target, cast, query, k).execute(tx)).rows;
  });
}

export interface StoredDimensions {
  dimensions: number;
  count: number;
}

/**
 * The dimensions a (provider, model) has embeddings at, most rows first: none
 * means nothing embedded yet; several happen after a `--dimensions` change
 * under another run.
 */
export async function embeddedDimensions(
  db: Kysely<DB>,
  target: { provider: string; model: string },
): Promise<StoredDimensions[]> {
  const rows = await db
    .selectFrom('message_embeddings')
    .select((eb) => ['dimensions', eb.fn.countAll<string>().as('n')])
    .where('provider', '=', target.provider)
    .where('model', '=', target.model)
    .groupBy('dimensions')
    .execute();
  return rows
    .map((r) => ({ dimensions: Number(r.dimensions), count: Number(r.n) }))
    .sort((a, b) => b.count - a.count || a.dimensions - b.dimensions);
}

/** One line for a search (or index) at a dimension the model has no embeddings at. */
export function dimensionsMismatch(
  target: { provider: string; model: string },
  wanted: number,
  stored: readonly StoredDimensions[],
): string {
  const have = stored.map((s) => s.dimensions);
  const list = have.length > 1 ? `${have.slice(0, -1).join(', ')} and ${have.at(-1)}` : have[0];
  return `no embeddings of ${target.provider}/${target.model} at ${wanted} dimensions; it has ${list}: pass ${have.map((d) => `--dimensions ${d}`).join(' or ')}`;
}
