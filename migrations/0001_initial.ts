import { type Kysely, sql } from 'kysely';
import type { MigrationContext } from '../src/db/migrator.js';

export async function up(db: Kysely<unknown>, ctx: MigrationContext): Promise<void> {
  if (ctx.source.table === 'messages') await createMessages(db);
  // Every message id column has the source's id type: bigint or uuid.
  const idType = sql.raw(await ctx.idType(db));

  // No fixed dimension: several models share the table. HNSW indexes are per
  // model, on an expression cast to that model's dimension (see README).
  const embeddingType = await ctx.embeddingColumnType(db);
  await db.schema
    .createTable('message_embeddings')
    .addColumn('provider', 'text', (c) => c.notNull())
    .addColumn('model', 'text', (c) => c.notNull())
    .addColumn('message_id', idType, (c) => c.notNull())
    .addColumn('embedding', sql.raw(embeddingType), (c) => c.notNull())
    .addColumn('dimensions', 'integer', (c) => c.notNull())
    .addColumn('content_sha256', 'bytea', (c) => c.notNull())
    .addColumn('input_tokens', 'integer', (c) => c.notNull())
    .addColumn('truncated', 'boolean', (c) => c.notNull().defaultTo(false))
    .addColumn('run_id', 'bigint')
    .addColumn('embedded_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addPrimaryKeyConstraint('message_embeddings_pkey', ['provider', 'model', 'message_id'])
    .execute();

  await db.schema
    .createTable('embedding_runs')
    .addColumn('id', 'bigint', (c) => c.primaryKey().generatedAlwaysAsIdentity())
    .addColumn('provider', 'text', (c) => c.notNull())
    .addColumn('model', 'text', (c) => c.notNull())
    .addColumn('status', 'text', (c) =>
      c
        .notNull()
        .defaultTo('running')
        .check(sql`status in ('running', 'succeeded', 'partial', 'failed', 'interrupted')`),
    )
    .addColumn('options', 'jsonb', (c) => c.notNull().defaultTo(sql`'{}'::jsonb`))
    .addColumn('host', 'text', (c) => c.notNull())
    .addColumn('pid', 'integer', (c) => c.notNull())
    .addColumn('started_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('finished_at', 'timestamptz')
    .addColumn('heartbeat_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('cursor_id', idType)
    .addColumn('planned', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('embedded', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('skipped', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('truncated', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('ineligible_blank', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('tokens', 'bigint', (c) => c.notNull().defaultTo(0))
    .addColumn('requests', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('retries', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('batches', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('error', 'text')
    .addColumn('summary', 'jsonb')
    .execute();
  await db.schema
    .createIndex('embedding_runs_model_started_idx')
    .on('embedding_runs')
    .columns(['provider', 'model', 'started_at'])
    .execute();

  await db.schema
    .createTable('embedding_batches')
    .addColumn('run_id', 'bigint', (c) =>
      c.notNull().references('embedding_runs.id').onDelete('cascade'),
    )
    .addColumn('batch_no', 'integer', (c) => c.notNull())
    .addColumn('first_message_id', idType, (c) => c.notNull())
    .addColumn('last_message_id', idType, (c) => c.notNull())
    .addColumn('size', 'integer', (c) => c.notNull())
    .addColumn('embedded', 'integer', (c) => c.notNull())
    .addColumn('skipped', 'integer', (c) => c.notNull())
    .addColumn('tokens', 'integer', (c) => c.notNull())
    .addColumn('attempts', 'integer', (c) => c.notNull())
    .addColumn('latency_ms', 'integer', (c) => c.notNull())
    .addColumn('committed_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addPrimaryKeyConstraint('embedding_batches_pkey', ['run_id', 'batch_no'])
    .execute();

  await db.schema
    .createTable('embedding_skips')
    .addColumn('run_id', 'bigint', (c) =>
      c.notNull().references('embedding_runs.id').onDelete('cascade'),
    )
    .addColumn('provider', 'text', (c) => c.notNull())
    .addColumn('model', 'text', (c) => c.notNull())
    .addColumn('message_id', idType, (c) => c.notNull())
    .addColumn('reason', 'text', (c) => c.notNull())
    .addColumn('detail', 'text', (c) => c.notNull())
    .addColumn('input_tokens', 'integer')
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addPrimaryKeyConstraint('embedding_skips_pkey', ['run_id', 'message_id'])
    .execute();
  await db.schema
    .createIndex('embedding_skips_model_message_idx')
    .on('embedding_skips')
    .columns(['provider', 'model', 'message_id'])
    .execute();
}

/**
 * The default source. `if not exists` so an application that already has a
 * messages(id, content) table keeps it; everything but id and content is
 * nullable or defaulted, so `insert into messages (id, content)` always works.
 * Not created when --source names the application's own table.
 */
async function createMessages(db: Kysely<unknown>): Promise<void> {
  await db.schema
    .createTable('messages')
    .ifNotExists()
    .addColumn('id', 'bigint', (c) => c.primaryKey())
    .addColumn('content', 'text', (c) => c.notNull())
    .addColumn('role', 'text')
    .addColumn('conversation_id', 'text')
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('updated_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .execute();
}
