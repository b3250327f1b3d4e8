import { type Kysely, sql } from 'kysely';
import { MigrationError, oneLine } from '../errors.js';
import type { EmbeddingColumnType } from './names.js';

const HOW_TO_GET_PGVECTOR =
  'install pgvector on the server (the pgvector/pgvector:pg17 image, or the postgresql-NN-pgvector package) or set EMBEDDING_COLUMN_TYPE=real[]';

/**
 * Picks the embedding column type at migration time. pgvector's own types
 * where the extension exists (always in PGlite); else real[] (Debian's
 * PostgreSQL and many self-hosted servers lack pgvector), said loudly once.
 * Forcing vector/halfvec without pgvector is an error that says how to get it.
 */
export async function resolveEmbeddingColumnType(
  db: Kysely<unknown>,
  options: { forcedColumnType?: EmbeddingColumnType | undefined; warn: (message: string) => void },
): Promise<EmbeddingColumnType> {
  const forced = options.forcedColumnType;
  if (forced === 'real[]') return 'real[]';
  if (!(await hasVectorExtension(db)) && (await vectorExtensionAvailable(db))) {
    // A savepoint, because a refused CREATE EXTENSION (no privilege) would
    // otherwise abort the whole migration transaction and rule out the fallback.
    await sql`savepoint pgembed_create_vector`.execute(db);
    try {
      await sql`create extension if not exists vector`.execute(db);
      await sql`release savepoint pgembed_create_vector`.execute(db);
    } catch (error) {
      await sql`rollback to savepoint pgembed_create_vector`.execute(db);
      if (forced) {
        throw new MigrationError(
          `EMBEDDING_COLUMN_TYPE=${forced} but CREATE EXTENSION vector failed (${oneLine(error)}); ask a superuser to run it, or ${HOW_TO_GET_PGVECTOR}`,
          { cause: error },
        );
      }
      options.warn(
        `pgvector is installed on the server but CREATE EXTENSION vector failed (${oneLine(error)}); storing embeddings as real[]`,
      );
      return 'real[]';
    }
  }
  if (await hasVectorExtension(db)) return forced ?? 'vector';
  if (forced) {
    throw new MigrationError(
      `EMBEDDING_COLUMN_TYPE=${forced} needs the pgvector extension, which this server does not have: ${HOW_TO_GET_PGVECTOR}`,
    );
  }
  options.warn(
    'WARNING: this Postgres server has no pgvector extension, so message_embeddings.embedding will be real[] (no vector indexes or operators). To get pgvector, use the pgvector/pgvector:pg17 image or install postgresql-NN-pgvector, then recreate the table, or set EMBEDDING_COLUMN_TYPE to choose explicitly.',
  );
  return 'real[]';
}

async function hasVectorExtension(db: Kysely<unknown>): Promise<boolean> {
  const { rows } = await sql<{ n: number }>`
    select count(*)::int as n from pg_extension where extname = 'vector'`.execute(db);
  return (rows[0]?.n ?? 0) > 0;
}

async function vectorExtensionAvailable(db: Kysely<unknown>): Promise<boolean> {
  const { rows } = await sql<{ n: number }>`
    select count(*)::int as n from pg_available_extensions where name = 'vector'`.execute(db);
  return (rows[0]?.n ?? 0) > 0;
}

/** The column's actual type, read from the catalog rather than remembered. */
export async function readEmbeddingColumnType<T>(db: Kysely<T>): Promise<EmbeddingColumnType> {
  const { rows } = await sql<{ type: string }>`
    select format_type(atttypid, atttypmod) as type from pg_attribute
    where attrelid = 'message_embeddings'::regclass and attname = 'embedding'`.execute(db);
  const type = rows[0]?.type;
  if (type === 'vector' || type === 'halfvec' || type === 'real[]') return type;
  throw new MigrationError(
    `message_embeddings.embedding has unexpected type ${type ?? '(missing)'}`,
  );
}

/**
 * The column type, or a MigrationError saying the database has no pgembed
 * tables yet and `fix` (what the calling command's user should run).
 */
export async function requireMigrated<T>(db: Kysely<T>, fix: string): Promise<EmbeddingColumnType> {
  return readEmbeddingColumnType(db).catch((error) => {
    throw new MigrationError(`the database has no pgembed tables yet: ${fix}`, { cause: error });
  });
}
