import { createHash } from 'node:crypto';
import { type Kysely, sql } from 'kysely';
import type { EmbeddingColumnType } from '../db/names.js';
import type { DB } from '../db/schema.js';
import { ConfigError } from '../errors.js';
import {
  castExpression,
  dimensionsMismatch,
  embeddedDimensions,
  modelPredicate,
  type OrderCast,
  orderCastFor,
} from './search.js';

export interface SearchIndexTarget {
  provider: string;
  model: string;
  /** --dimensions; undefined: the one dimension the model's rows have. */
  dimensions: number | undefined;
}

export interface SearchIndexResult {
  name: string;
  dimensions: number;
  cast: OrderCast;
  /** Rows the index covers. */
  rows: number;
  /** `exists`: a valid index of that name was already there, nothing was done. */
  state: 'created' | 'exists' | 'rebuilt';
}

/**
 * The index's name, the same for the same provider, model and dimension on
 * every run: a readable slug, the dimension, and a hash of the exact names (two
 * models whose slugs agree still get different indexes). At most 63 bytes.
 */
export function searchIndexName(provider: string, model: string, dimensions: number): string {
  const hash = createHash('sha256')
    .update(`${provider}\0${model}\0${dimensions}`)
    .digest('hex')
    .slice(0, 8);
  const prefix = 'pgembed_hnsw_';
  const suffix = `_${dimensions}_${hash}`;
  const slug = `${provider}_${model}`
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, '_')
    .replace(/^_+|_+$/g, '')
    .slice(0, 63 - prefix.length - suffix.length)
    .replace(/_+$/, '');
  return `${prefix}${slug}${suffix}`;
}

/**
 * Creates the HNSW index search uses for one (provider, model, dimension): on
 * the expression search orders by (`embedding::vector(N)`, or `halfvec(N)`
 * above 2,000 dimensions), partial on `provider = … and model = … and
 * dimensions = N`, cosine. The dimension comes from the stored rows (or
 * --dimensions when the model has several). Idempotent: a valid index of the
 * same name is left as it is; an invalid one (a concurrent build that failed
 * or was interrupted) is dropped and built again. `concurrently` on a server,
 * so writers are not blocked; PGlite has one session and nobody to block, so
 * a plain build there.
 */
export async function createSearchIndex(
  db: Kysely<DB>,
  columnType: EmbeddingColumnType,
  target: SearchIndexTarget,
  options: { concurrently: boolean },
): Promise<SearchIndexResult> {
  const label = `${target.provider}/${target.model}`;
  if (columnType === 'real[]') {
    throw new ConfigError(
      'message_embeddings.embedding is real[] (this server has no pgvector), which HNSW cannot index: search still works, exactly, over every row of the model; for an index, use a server with pgvector (the pgvector/pgvector:pg17 image or the postgresql-NN-pgvector package) and embed into a new database',
    );
  }
  const stored = await embeddedDimensions(db, target);
  if (stored.length === 0) {
    throw new ConfigError(
      `no embeddings for ${label} yet: run \`pgembed embed\` with the same provider and model first (the index takes its dimension from them)`,
    );
  }
  const dimensions = target.dimensions ?? (stored.length === 1 ? stored[0]?.dimensions : undefined);
  if (dimensions === undefined) {
    throw new ConfigError(
      `${label} has embeddings at ${stored.map((s) => s.dimensions).join(' and ')} dimensions: pass ${stored.map((s) => `--dimensions ${s.dimensions}`).join(' or ')} to say which to index`,
    );
  }
  const rows = stored.find((s) => s.dimensions === dimensions)?.count;
  if (rows === undefined) throw new ConfigError(dimensionsMismatch(target, dimensions, stored));
  const cast = await orderCastFor(db, columnType, dimensions);
  if (!cast.indexable) {
    throw new ConfigError(
      `cannot index ${label} at ${dimensions} dimensions: ${cast.why}; search still works, scanning the model's rows exactly`,
    );
  }

  const name = searchIndexName(target.provider, target.model, dimensions);
  const concurrently = sql.raw(options.concurrently ? ' concurrently' : '');
  const existing = await sql<{ valid: boolean }>`
    select i.indisvalid as valid from pg_index i join pg_class c on c.oid = i.indexrelid
    where i.indrelid = 'message_embeddings'::regclass and c.relname = ${name}`.execute(db);
  if (existing.rows[0]?.valid === true) return { name, dimensions, cast, rows, state: 'exists' };
  if (existing.rows[0]) {
    await sql`drop index${concurrently} if exists ${sql.id(name)}`.execute(db);
  }
  const opclass = sql.raw(cast.type === 'halfvec' ? 'halfvec_cosine_ops' : 'vector_cosine_ops');
  await sql`
    create index${concurrently} if not exists ${sql.id(name)} on message_embeddings
    using hnsw ((${castExpression(cast)}) ${opclass})
    where ${modelPredicate(target, dimensions)}`.execute(db);
  return { name, dimensions, cast, rows, state: existing.rows[0] ? 'rebuilt' : 'created' };
}
