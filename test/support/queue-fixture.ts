import { createHash } from 'node:crypto';
import { type Kysely, sql } from 'kysely';
import { afterAll, beforeAll, beforeEach } from 'vitest';
import type { Database } from '../../src/db/connect.js';
import { readEmbeddingColumnType } from '../../src/db/embedding-column.js';
import {
  DEFAULT_SOURCE,
  type EmbeddingColumnType,
  type IdType,
  type MessageSource,
} from '../../src/db/names.js';
import type { DB } from '../../src/db/schema.js';
import { vectorLiteral } from '../../src/db/vector.js';
import {
  type ClaimedMessage,
  type ClaimScope,
  claimBatch,
  ensureTarget,
} from '../../src/sql/queue.js';
import { type Settled, type Settlement, settleBatch } from '../../src/sql/settle.js';
import { type BackendName, createTestDatabase, openMigrated, type TestDatabase } from './db.js';

export const SMALL = { provider: 'openai', model: 'small' };
export const LARGE = { provider: 'openai', model: 'large' };
/** A model with embeddings and no target of its own. */
export const OTHER = { provider: 'local', model: 'minilm' };
export type Model = typeof SMALL;

export const sha256 = (text: string) => createHash('sha256').update(text, 'utf8').digest();

/**
 * A migrated database of `backend` for one file's tests, and a QueueFixture
 * on it (the default source, bigint ids), reset before each test. `url`
 * opens more connections to it (a writer beside the worker).
 */
export function useQueueFixture(backend: BackendName): {
  url: () => string;
  database: () => Database;
  fixture: () => QueueFixture;
} {
  let target: TestDatabase | undefined;
  let database: Database | undefined;
  let fixture: QueueFixture | undefined;
  beforeAll(async () => {
    target = await createTestDatabase(backend);
    database = await openMigrated(target.url);
    const db = database.db;
    fixture = new QueueFixture(
      db,
      await readEmbeddingColumnType(db),
      DEFAULT_SOURCE,
      'bigint',
      database.oneSession,
    );
  });
  afterAll(async () => {
    await database?.close();
    await target?.drop();
  });
  beforeEach(() => fixture?.reset());
  const set = <T>(value: T | undefined): T => {
    if (value === undefined) throw new Error('useQueueFixture: used outside its tests');
    return value;
  };
  return { url: () => set(target).url, database: () => set(database), fixture: () => set(fixture) };
}

/**
 * Polls a database condition until it holds. The deadline is no timing
 * assertion, only a bound past the test's own timeout, so that a test that
 * timed out does not go on polling (and holding its transaction) forever.
 */
export async function waitFor(check: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + 90_000;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('condition never held');
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Each claimed message's queue row version, as the fence takes them. */
export const versionsOf = (claimed: ClaimedMessage[]) =>
  Object.fromEntries(claimed.map((c) => [c.id, c.version]));

/** from..to, both included. */
export const range = (from: number, to: number) =>
  Array.from({ length: to - from + 1 }, (_, i) => from + i);

/** What a batch did: `work`, and nothing else. */
export function settlement(work: Partial<Settlement>): Settlement {
  return {
    versions: {},
    embedded: [],
    skipped: [],
    gone: [],
    blank: [],
    unchanged: [],
    deferred: [],
    released: [],
    ...work,
  };
}

/** A batch's commit statement with no vectors to write; `work` says the rest. */
export async function settle(
  db: Kysely<DB>,
  scope: ClaimScope,
  work: Partial<Settlement>,
  options: { lockTimeout?: string; batch?: Parameters<typeof settleBatch>[2] } = {},
): Promise<Settled> {
  const { lockTimeout, batch } = options;
  return settleBatch(db, scope, batch, settlement(work), {
    vectors: () => undefined,
    ...(lockTimeout ? { lockTimeout } : {}),
  });
}

/** A target row made directly, without ensureTarget's lock and scan bookkeeping. */
export async function addTarget(db: Kysely<DB>, model: Model): Promise<number> {
  const { rows } = await sql<{ id: number }>`
    insert into embedding_targets (provider, model) values (${model.provider}, ${model.model})
    returning id`.execute(db);
  const id = rows[0]?.id;
  if (id === undefined) throw new Error('no target id');
  return id;
}

/** The queue as `model:id` strings, sorted, to compare whole. */
export async function queuedKeys(db: Kysely<DB>): Promise<string[]> {
  const { rows } = await sql<{ key: string }>`
    select t.model || ':' || q.message_id::text as key
    from embedding_queue q join embedding_targets t on t.id = q.target_id
    order by t.model, q.message_id`.execute(db);
  return rows.map((r) => r.key);
}

/** Every embedding as `model:id`, sorted. */
export async function embeddingKeys(db: Kysely<DB>): Promise<string[]> {
  const { rows } = await sql<{ key: string }>`
    select model || ':' || message_id::text as key from message_embeddings
    order by model, message_id`.execute(db);
  return rows.map((r) => r.key);
}

/** Embeddings of `contentOf(id)` (by default of nothing the source holds) under `model`. */
export async function insertEmbeddings(
  db: Kysely<DB>,
  columnType: EmbeddingColumnType,
  model: Model,
  ids: Array<string | number>,
  contentOf: (id: string) => string = () => '',
): Promise<void> {
  for (const id of ids) {
    await sql`
      insert into message_embeddings
        (provider, model, message_id, embedding, dimensions, content_sha256, input_tokens)
      values (${model.provider}, ${model.model}, ${String(id)},
              ${vectorLiteral([1, 2, 3], columnType)}::${sql.raw(columnType)}, 3,
              ${sha256(contentOf(String(id)))}, 1)`.execute(db);
  }
}

/**
 * Queue test data written as the worker would, on one database and source,
 * and read back whole, for the tests of the change queue, the capture
 * triggers, the reconciliation scan and the claim keyset.
 */
export class QueueFixture {
  constructor(
    readonly db: Kysely<DB>,
    readonly columnType: EmbeddingColumnType,
    readonly source: MessageSource,
    readonly idType: IdType,
    /** As the CLI sets it: true on PGlite (ClaimScope.oneSession). */
    readonly oneSession: boolean,
  ) {}

  async messages(rows: Array<[string | number, string | null]>): Promise<void> {
    const { table, idColumn, textColumn } = this.source;
    for (const [id, content] of rows) {
      await sql`insert into ${sql.table(table)} (${sql.id(idColumn)}, ${sql.id(textColumn)})
                values (${id}, ${content})`.execute(this.db);
    }
  }

  /** An embedding of `content` under `model`. */
  async embedding(model: Model, id: string | number, content: string): Promise<void> {
    await insertEmbeddings(this.db, this.columnType, model, [id], () => content);
  }

  /** What a test before may have left: messages, targets (and so the queue), embeddings, runs. */
  async reset(): Promise<void> {
    await sql`delete from messages`.execute(this.db);
    await sql`delete from embedding_targets`.execute(this.db);
    await sql`delete from message_embeddings`.execute(this.db);
    await sql`delete from embedding_runs`.execute(this.db);
  }

  async run(model: Model, status = 'running'): Promise<string> {
    const { rows } = await sql<{ id: string }>`
      insert into embedding_runs (provider, model, host, pid, status)
      values (${model.provider}, ${model.model}, 'test-host', 1, ${status})
      returning id::text as id`.execute(this.db);
    const id = rows[0]?.id;
    if (!id) throw new Error('no run id');
    return id;
  }

  /** A skip of `content`: null for one recorded before skips kept their content. */
  async skip(model: Model, id: string, content: string | null): Promise<void> {
    await sql`
      insert into embedding_skips (run_id, provider, model, message_id, reason, detail, content_sha256)
      values (${await this.run(model)}, ${model.provider}, ${model.model}, ${id},
              'too_long', 'over the token limit', ${content === null ? null : sha256(content)})`.execute(
      this.db,
    );
  }

  async scope(model: Model): Promise<ClaimScope> {
    const target = await ensureTarget(this.db, model.provider, model.model);
    return {
      targetId: target.id,
      runId: await this.run(model),
      ...model,
      source: this.source,
      idType: this.idType,
      oneSession: this.oneSession,
    };
  }

  /** The target's queue rows: id → who holds it ('' for no one). */
  async holders(targetId: number): Promise<Record<string, string>> {
    const { rows } = await sql<{ id: string; by: string | null }>`
      select message_id::text as id, claimed_by::text as by from embedding_queue
      where target_id = ${targetId} order by message_id`.execute(this.db);
    return Object.fromEntries(rows.map((r) => [r.id, r.by ?? '']));
  }

  /** The first 10 pending rows of the scope's queue, claimed as a one-shot run's first claim. */
  claimFirst(scope: ClaimScope): Promise<ClaimedMessage[]> {
    return claimBatch(this.db, scope, { after: null, limit: 10, ignoreBackoff: false });
  }

  /** The target's queue: id → forced. */
  async queue(targetId: number): Promise<Record<string, boolean>> {
    const { rows } = await sql<{ id: string; force: boolean }>`
      select message_id::text as id, force from embedding_queue
      where target_id = ${targetId} order by message_id`.execute(this.db);
    return Object.fromEntries(rows.map((r) => [r.id, r.force]));
  }

  /** Every embedding as `model:id`, sorted. */
  embeddings(): Promise<string[]> {
    return embeddingKeys(this.db);
  }

  async backfilled(targetId: number): Promise<boolean> {
    const { rows } = await sql<{ done: boolean }>`
      select backfilled_at is not null as done from embedding_targets where id = ${targetId}`.execute(
      this.db,
    );
    return rows[0]?.done === true;
  }
}
