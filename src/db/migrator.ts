import { readdir } from 'node:fs/promises';
import { type Kysely, type Migration, type MigrationProvider, Migrator, sql } from 'kysely';
import { MigrationError, oneLine, PgembedError } from '../errors.js';
import { registerSource } from '../sql/capture.js';
import type { Database } from './connect.js';
import { readEmbeddingColumnType, resolveEmbeddingColumnType } from './embedding-column.js';
import {
  DEFAULT_SOURCE,
  type EmbeddingColumnType,
  type IdType,
  type MessageSource,
} from './names.js';
import { inspectSource } from './source.js';

/** What a migration file may use besides `db`. */
export interface MigrationContext {
  /** Decides vector / halfvec / real[] for the embedding column; warns once on fallback. */
  embeddingColumnType(db: Kysely<unknown>): Promise<EmbeddingColumnType>;
  /** Where the messages are; pgembed creates `messages` only when that is the source. */
  source: MessageSource;
  /** The source's id type, which every message_id column follows. */
  idType(db: Kysely<unknown>): Promise<IdType>;
}

interface MigrationModule {
  up(db: Kysely<unknown>, ctx: MigrationContext): Promise<void>;
  down?(db: Kysely<unknown>, ctx: MigrationContext): Promise<void>;
}

// src/db/ → migrations/, both in the source tree (tsx) and in dist/ (compiled).
const MIGRATIONS_DIR = new URL('../../migrations/', import.meta.url);

/** Plain files in migrations/, in name order; `.ts` under tsx and `.js` once compiled. */
class DirectoryMigrationProvider implements MigrationProvider {
  constructor(private readonly ctx: MigrationContext) {}

  async getMigrations(): Promise<Record<string, Migration>> {
    const files = (await readdir(MIGRATIONS_DIR))
      .filter((f) => /\.(ts|js)$/.test(f) && !f.endsWith('.d.ts') && f !== 'index.ts')
      .sort();
    const migrations: Record<string, Migration> = {};
    for (const file of files) {
      const mod = (await import(new URL(file, MIGRATIONS_DIR).href)) as MigrationModule;
      const { down } = mod;
      migrations[file.replace(/\.(ts|js)$/, '')] = {
        up: (db) => mod.up(db, this.ctx),
        ...(down ? { down: (db: Kysely<unknown>) => down(db, this.ctx) } : {}),
      };
    }
    return migrations;
  }
}

export interface MigrateOptions {
  /** EMBEDDING_COLUMN_TYPE; undefined means pick the best the server has. */
  forcedColumnType?: EmbeddingColumnType | undefined;
  warn: (message: string) => void;
  /** The messages' table or view; default pgembed's own `messages`. */
  source?: MessageSource | undefined;
  /** Capture a table's changes with triggers (default); false: reconciliation scans only. */
  triggers?: boolean | undefined;
}

export interface MigrateResult {
  applied: string[];
  embeddingColumnType: EmbeddingColumnType;
}

/**
 * Applies pending migrations. Safe when several processes start at once: Kysely's
 * Postgres adapter serialises migrators with an advisory lock, and a second run
 * finds nothing pending.
 */
export async function migrateToLatest(
  database: Database,
  options: MigrateOptions,
): Promise<MigrateResult> {
  const source = options.source ?? DEFAULT_SOURCE;
  const ctx: MigrationContext = {
    embeddingColumnType: (db) => resolveEmbeddingColumnType(db, options),
    source,
    // pgembed's own messages table, not created yet, will have bigint ids.
    idType: async (db) =>
      source === DEFAULT_SOURCE && !(await relationExists(db, 'messages'))
        ? 'bigint'
        : inspectSource(db, source),
  };
  // The bookkeeping tables live in the schema pgembed's own do: Kysely would
  // otherwise find another schema's (a second source in a schema of its own,
  // reached with search_path) and take this one for migrated.
  const migrator = await migratorFor(database, ctx);
  const { error, results } = await migrator.migrateToLatest();
  if (error) {
    // Ours already say what is wrong (a forced type, a --source that does not exist).
    if (error instanceof PgembedError) throw error;
    const failed = results?.find((r) => r.status === 'Error')?.migrationName;
    throw new MigrationError(
      `migration ${failed ?? '(setup)'} failed on ${database.describe}: ${oneLine(error)}`,
      { cause: error },
    );
  }
  // The source's change capture follows the schema: the triggers are (re)made
  // here, so `migrate` alone readies a database for workers and writers.
  await registerSource(database.db, source, { triggers: options.triggers ?? true });
  const actual = await readEmbeddingColumnType(database.db);
  if (options.forcedColumnType && actual !== options.forcedColumnType) {
    throw new MigrationError(
      `EMBEDDING_COLUMN_TYPE=${options.forcedColumnType} but message_embeddings.embedding is already ${actual}; unset it, or convert the column yourself (ALTER TABLE message_embeddings ALTER COLUMN embedding TYPE …)`,
    );
  }
  return {
    applied: (results ?? []).filter((r) => r.status === 'Success').map((r) => r.migrationName),
    embeddingColumnType: actual,
  };
}

async function migratorFor(database: Database, ctx: MigrationContext): Promise<Migrator> {
  const { rows } = await sql<{ schema: string }>`select current_schema() as schema`.execute(
    database.db,
  );
  return new Migrator({
    db: database.db,
    provider: new DirectoryMigrationProvider(ctx),
    ...(rows[0]?.schema ? { migrationTableSchema: rows[0].schema } : {}),
  });
}

/**
 * Migrations this code has that the database has not applied: a worker is
 * not ready against an older schema (with --no-migrate, or while another
 * process migrates). Reads only; applies nothing.
 */
export async function pendingMigrations(database: Database): Promise<string[]> {
  const readOnly = (): never => {
    throw new Error('pendingMigrations applies nothing');
  };
  const migrator = await migratorFor(database, {
    embeddingColumnType: readOnly,
    source: DEFAULT_SOURCE,
    idType: readOnly,
  });
  const migrations = await migrator.getMigrations();
  return migrations.filter((m) => m.executedAt === undefined).map((m) => m.name);
}

async function relationExists(db: Kysely<unknown>, name: string): Promise<boolean> {
  const { rows } = await sql<{ exists: boolean }>`
    select to_regclass(${name}) is not null as exists`.execute(db);
  return rows[0]?.exists === true;
}
