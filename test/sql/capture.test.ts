import { randomBytes } from 'node:crypto';
import { type Kysely, sql } from 'kysely';
import pg from 'pg';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { type Database, openDatabase } from '../../src/db/connect.js';
import { readEmbeddingColumnType } from '../../src/db/embedding-column.js';
import { migrateToLatest } from '../../src/db/migrator.js';
import {
  DEFAULT_SOURCE,
  type EmbeddingColumnType,
  type MessageSource,
} from '../../src/db/names.js';
import type { DB } from '../../src/db/schema.js';
import { ConfigError } from '../../src/errors.js';
import { captureMode, registerSource, WAKE_CHANNEL } from '../../src/sql/capture.js';
import { backends, createTestDatabase, openMigrated, type TestDatabase } from '../support/db.js';
import {
  addTarget,
  embeddingKeys,
  insertEmbeddings,
  LARGE,
  OTHER,
  queuedKeys,
  SMALL,
} from '../support/queue-fixture.js';

// OTHER: a model with embeddings but no target: deletes remove every model's embeddings.

async function captureTriggers(db: Kysely<DB>, table: string): Promise<string[]> {
  const { rows } = await sql<{ name: string }>`
    select tgname::text as name from pg_trigger
    where tgrelid = to_regclass(${table}) and tgname::text like 'pgembed_capture_%'
    order by tgname`.execute(db);
  return rows.map((r) => r.name);
}

/** The names of a schema's four capture triggers, sorted. */
const triggersOf = (schema: string) =>
  ['delete', 'insert', 'truncate', 'update'].map((op) => `pgembed_capture_${op}_${schema}`);
const ALL_TRIGGERS = triggersOf('public');

describe.each(backends())('change capture on %s', (backend) => {
  let target: TestDatabase;
  let database: Database;
  let columnType: EmbeddingColumnType;
  const db = () => database.db;

  beforeAll(async () => {
    target = await createTestDatabase(backend);
    database = await openMigrated(target.url);
    columnType = await readEmbeddingColumnType(db());
  });
  afterAll(async () => {
    await database?.close();
    await target?.drop();
  });
  beforeEach(async () => {
    // What a test that failed half-way may have left: capture off, other schemas.
    await sql`drop schema if exists app cascade`.execute(db());
    await sql`drop schema if exists b cascade`.execute(db());
    await registerSource(db(), DEFAULT_SOURCE, { triggers: true });
    await sql`delete from messages`.execute(db());
    await sql`delete from embedding_targets`.execute(db());
    await sql`delete from message_embeddings`.execute(db());
    expect(await queuedKeys(db())).toEqual([]);
  });

  // Databases of a test's own (another source, or capture switched off).
  const cleanups: Array<() => Promise<void>> = [];
  afterEach(async () => {
    while (cleanups.length) await cleanups.pop()?.();
  });
  async function fresh(): Promise<Database> {
    const own = await createTestDatabase(backend);
    cleanups.push(() => own.drop());
    const opened = await openDatabase(own.url);
    cleanups.push(() => opened.close());
    return opened;
  }

  it('is installed by migrate on pgembed’s own messages table', async () => {
    expect(await captureMode(db())).toBe('triggers');
    expect(await captureTriggers(db(), 'messages')).toEqual(ALL_TRIGGERS);
    // Migrating again changes nothing: the registration is idempotent.
    expect(await registerSource(db(), DEFAULT_SOURCE, { triggers: true })).toEqual({
      capture: 'triggers',
      changed: false,
    });
  });

  it('enqueues an inserted message once for every target, and nothing without a target', async () => {
    await sql`insert into messages (id, content) values (100, 'before any target')`.execute(db());
    expect(await queuedKeys(db())).toEqual([]);

    await addTarget(db(), SMALL);
    await addTarget(db(), LARGE);
    await sql`insert into messages (id, content) values (1, 'one'), (2, 'two'), (3, ' ')`.execute(
      db(),
    );
    await sql`insert into messages (id, content) values (4, 'four')`.execute(db());
    expect(await queuedKeys(db())).toEqual([
      'large:1',
      'large:2',
      'large:3',
      'large:4',
      'small:1',
      'small:2',
      'small:3',
      'small:4',
    ]);
    const { rows } = await sql<Record<string, unknown>>`
      select distinct force, attempts, claimed_by, not_before, last_error
      from embedding_queue`.execute(db());
    expect(rows).toEqual([
      { force: false, attempts: 0, claimed_by: null, not_before: null, last_error: null },
    ]);
  });

  it('enqueues an update only when it changes the text, and a re-enqueue clears a backoff but keeps the oldest change time', async () => {
    await sql`insert into messages (id, content) values (1, 'one'), (2, 'two'), (3, 'three')`.execute(
      db(),
    );
    await addTarget(db(), SMALL);
    await addTarget(db(), LARGE);

    await sql`update messages set role = 'user', updated_at = now() + interval '1 hour'`.execute(
      db(),
    );
    await sql`update messages set content = content`.execute(db());
    await sql`update messages set content = 'two' where id = 2`.execute(db());
    expect(await queuedKeys(db())).toEqual([]);

    await sql`update messages set content = 'two, edited' where id in (1, 2)
              and content = 'two'`.execute(db());
    expect(await queuedKeys(db())).toEqual(['large:2', 'small:2']);

    // A row backing off (a deferred failure) is due again once its text changes.
    await sql`update embedding_queue set not_before = now() + interval '1 hour', attempts = 3,
              last_error = 'HTTP 503', force = true,
              changed_at = '2000-01-01T00:00:00Z'`.execute(db());
    await sql`update messages set content = 'two, edited again' where id = 2`.execute(db());
    const { rows } = await sql<Record<string, unknown>>`
      select distinct not_before, attempts, last_error, force,
             changed_at = '2000-01-01T00:00:00Z'::timestamptz as kept_changed_at
      from embedding_queue`.execute(db());
    expect(rows).toEqual([
      { not_before: null, attempts: 0, last_error: null, force: false, kept_changed_at: true },
    ]);
    expect(await queuedKeys(db())).toEqual(['large:2', 'small:2']);
  });

  it('removes a deleted message’s queue rows and every model’s embeddings of it', async () => {
    await addTarget(db(), SMALL);
    await addTarget(db(), LARGE);
    await sql`insert into messages (id, content) values (1, 'one'), (2, 'two'), (3, 'three')`.execute(
      db(),
    );
    for (const t of [SMALL, LARGE, OTHER]) {
      await insertEmbeddings(db(), columnType, t, ['1', '2', '3']);
    }

    await sql`delete from messages where id in (1, 3)`.execute(db());
    expect(await queuedKeys(db())).toEqual(['large:2', 'small:2']);
    expect(await embeddingKeys(db())).toEqual(['large:2', 'minilm:2', 'small:2']);
  });

  it('empties the queue and the embeddings on TRUNCATE', async () => {
    await addTarget(db(), SMALL);
    await sql`insert into messages (id, content) values (1, 'one'), (2, 'two')`.execute(db());
    await insertEmbeddings(db(), columnType, SMALL, ['1', '2']);
    await insertEmbeddings(db(), columnType, OTHER, ['1']);
    expect(await queuedKeys(db())).toHaveLength(2);

    await sql`truncate messages`.execute(db());
    expect(await queuedKeys(db())).toEqual([]);
    expect(await embeddingKeys(db())).toEqual([]);
  });

  it('treats an update of the id as a delete of the old id and an insert of the new', async () => {
    await sql`insert into messages (id, content) values (1, 'one'), (2, 'two'), (3, 'three')`.execute(
      db(),
    );
    await addTarget(db(), SMALL);
    for (const t of [SMALL, OTHER]) {
      await insertEmbeddings(db(), columnType, t, ['1', '2', '3']);
    }

    await sql`update messages set id = 10 where id = 1`.execute(db());
    expect(await queuedKeys(db())).toEqual(['small:10']);
    expect(await embeddingKeys(db())).toEqual(['minilm:2', 'minilm:3', 'small:2', 'small:3']);

    // One statement that moves one id and edits another message.
    await sql`update messages set id = case id when 10 then 20 else id end,
              content = case id when 2 then 'two, edited' else content end
              where id in (2, 10)`.execute(db());
    expect(await queuedKeys(db())).toEqual(['small:2', 'small:20']);
    expect(await embeddingKeys(db())).toEqual(['minilm:2', 'minilm:3', 'small:2', 'small:3']);
  });

  it('works for a writer whose search_path does not include pgembed’s schema', async () => {
    await addTarget(db(), SMALL);
    await insertEmbeddings(db(), columnType, SMALL, ['2']);
    const { rows: before } = await sql<{ path: string }>`show search_path`.execute(db());
    await sql`create schema if not exists app`.execute(db());
    // Were the trigger functions to resolve names on the writer's path, they
    // would find this empty table and enqueue nothing.
    await sql`create table if not exists app.embedding_targets (id int, provider text, model text)`.execute(
      db(),
    );
    await db()
      .transaction()
      .execute(async (trx) => {
        await sql`set local search_path = app`.execute(trx);
        const { rows } = await sql<{ schema: string | null }>`
          select current_schema() as schema`.execute(trx);
        expect(rows[0]?.schema).toBe('app');
        await sql`insert into public.messages (id, content) values (1, 'one'), (2, 'two')`.execute(
          trx,
        );
        await sql`update public.messages set content = 'one, edited' where id = 1`.execute(trx);
        await sql`delete from public.messages where id = 2`.execute(trx);
      });
    const { rows: after } = await sql<{ path: string }>`show search_path`.execute(db());
    expect(after).toEqual(before);
    expect(await queuedKeys(db())).toEqual(['small:1']);
    expect(await embeddingKeys(db())).toEqual([]);

    await insertEmbeddings(db(), columnType, SMALL, ['1']);
    await db()
      .transaction()
      .execute(async (trx) => {
        await sql`set local search_path = app`.execute(trx);
        await sql`truncate public.messages`.execute(trx);
      });
    expect(await queuedKeys(db())).toEqual([]);
    expect(await embeddingKeys(db())).toEqual([]);
  });

  it('captures a table of the application’s with other column names, and refuses a second source', async () => {
    const own = await fresh();
    const source: MessageSource = { table: 'app_msgs', idColumn: 'msg_id', textColumn: 'body' };
    // Deferrable, so one update can move every id up by one.
    await sql`create table app_msgs (msg_id bigint primary key deferrable initially deferred,
              body text not null, tag text)`.execute(own.db);
    await migrateToLatest(own, { warn() {}, source });
    expect(await captureMode(own.db)).toBe('triggers');
    expect(await captureTriggers(own.db, 'app_msgs')).toEqual(ALL_TRIGGERS);
    const { rows: messagesTable } = await sql<{ exists: boolean }>`
      select to_regclass('messages') is not null as exists`.execute(own.db);
    expect(messagesTable[0]?.exists).toBe(false);

    await addTarget(own.db, SMALL);
    const ownColumnType = await readEmbeddingColumnType(own.db);
    await sql`insert into app_msgs (msg_id, body) values (1, 'one'), (2, 'two'), (3, 'three')`.execute(
      own.db,
    );
    expect(await queuedKeys(own.db)).toEqual(['small:1', 'small:2', 'small:3']);
    await sql`delete from embedding_queue`.execute(own.db);
    await insertEmbeddings(own.db, ownColumnType, SMALL, ['1', '2', '3']);

    await sql`update app_msgs set tag = 'x'`.execute(own.db);
    expect(await queuedKeys(own.db)).toEqual([]);
    await sql`update app_msgs set body = 'two, edited' where msg_id = 2`.execute(own.db);
    expect(await queuedKeys(own.db)).toEqual(['small:2']);
    await sql`delete from app_msgs where msg_id = 3`.execute(own.db);
    expect(await embeddingKeys(own.db)).toEqual(['small:1', 'small:2']);

    // Every id moves up one: 1 is gone, 2 keeps its id with 1's text
    // (enqueued as changed), and 3 is new with 2's text.
    await sql`delete from embedding_queue`.execute(own.db);
    await sql`update app_msgs set msg_id = msg_id + 1`.execute(own.db);
    expect(await queuedKeys(own.db)).toEqual(['small:2', 'small:3']);
    expect(await embeddingKeys(own.db)).toEqual(['small:2']);

    expect(await registerSource(own.db, source, { triggers: true })).toEqual({
      capture: 'triggers',
      changed: false,
    });
    for (const other of [
      DEFAULT_SOURCE,
      { ...source, textColumn: 'tag' },
      { ...source, idColumn: 'body' },
    ]) {
      const error = await registerSource(own.db, other, { triggers: true }).catch(
        (caught: unknown) => caught,
      );
      expect(error).toBeInstanceOf(ConfigError);
      expect((error as Error).message).toMatch(
        /^this schema's embeddings belong to --source app_msgs \(--id-column msg_id, --text-column body\); one schema holds one source/,
      );
    }
    // The refusal changed nothing.
    const { rows } = await sql<Record<string, unknown>>`
      select relation, id_column, text_column, capture from embedding_sources`.execute(own.db);
    expect(rows).toEqual([
      { relation: 'app_msgs', id_column: 'msg_id', text_column: 'body', capture: 'triggers' },
    ]);
    expect(await captureTriggers(own.db, 'app_msgs')).toEqual(ALL_TRIGGERS);
  });

  it('captures a view by reconciliation only: no triggers', async () => {
    const own = await fresh();
    await sql`create table docs (id bigint primary key, txt text not null)`.execute(own.db);
    await sql`create view doc_view as select id, txt as body from docs`.execute(own.db);
    await migrateToLatest(own, {
      warn() {},
      source: { table: 'doc_view', idColumn: 'id', textColumn: 'body' },
    });
    expect(await captureMode(own.db)).toBe('reconcile');
    const { rows } = await sql<{ n: number }>`
      select count(*)::int as n from pg_trigger where tgname::text like 'pgembed_capture_%'`.execute(
      own.db,
    );
    expect(rows[0]?.n).toBe(0);
    await addTarget(own.db, SMALL);
    await sql`insert into docs (id, txt) values (1, 'one')`.execute(own.db);
    expect(await queuedKeys(own.db)).toEqual([]);
  });

  it('drops the triggers with triggers: false, marks every target for a scan, and puts them back', async () => {
    const own = database;
    const small = await addTarget(own.db, SMALL);
    await addTarget(own.db, LARGE);
    await sql`update embedding_targets set backfilled_at = now()`.execute(own.db);
    const backfilled = async () => {
      const { rows } = await sql<{ id: number; backfilled: boolean }>`
        select id, backfilled_at is not null as backfilled from embedding_targets order by id`.execute(
        own.db,
      );
      return rows.filter((r) => r.backfilled).map((r) => r.id);
    };
    expect(await backfilled()).toHaveLength(2);

    expect(await registerSource(own.db, DEFAULT_SOURCE, { triggers: false })).toEqual({
      capture: 'reconcile',
      changed: true,
    });
    expect(await captureMode(own.db)).toBe('reconcile');
    expect(await captureTriggers(own.db, 'messages')).toEqual([]);
    expect(await backfilled()).toEqual([]);
    await sql`insert into messages (id, content) values (1, 'one')`.execute(own.db);
    expect(await queuedKeys(own.db)).toEqual([]);

    // Asking again changes nothing, and leaves the targets' scans as they are.
    await sql`update embedding_targets set backfilled_at = now() where id = ${small}`.execute(
      own.db,
    );
    expect(await registerSource(own.db, DEFAULT_SOURCE, { triggers: false })).toEqual({
      capture: 'reconcile',
      changed: false,
    });
    expect(await backfilled()).toEqual([small]);

    expect(await registerSource(own.db, DEFAULT_SOURCE, { triggers: true })).toEqual({
      capture: 'triggers',
      changed: true,
    });
    expect(await captureMode(own.db)).toBe('triggers');
    expect(await captureTriggers(own.db, 'messages')).toEqual(ALL_TRIGGERS);
    // What was written without triggers is unknown to the queue: scan again.
    expect(await backfilled()).toEqual([]);
    await sql`insert into messages (id, content) values (2, 'two')`.execute(own.db);
    expect(await queuedKeys(own.db)).toEqual(['large:2', 'small:2']);

    // Triggers gone behind its back (a table dropped and made again, say)
    // are put back on the next start, and the targets scan for what was missed.
    await sql`update embedding_targets set backfilled_at = now()`.execute(own.db);
    await sql`drop trigger pgembed_capture_update_public on messages`.execute(own.db);
    expect(await registerSource(own.db, DEFAULT_SOURCE, { triggers: true })).toEqual({
      capture: 'triggers',
      changed: true,
    });
    expect(await captureTriggers(own.db, 'messages')).toEqual(ALL_TRIGGERS);
    expect(await backfilled()).toEqual([]);
    await sql`delete from embedding_queue`.execute(own.db);
    await sql`update messages set content = 'two, edited' where id = 2`.execute(own.db);
    expect(await queuedKeys(own.db)).toEqual(['large:2', 'small:2']);
  });

  it('replaces the capture functions of an older version in place, without a scan', async () => {
    await addTarget(db(), SMALL);
    await sql`update embedding_targets set backfilled_at = now()`.execute(db());
    // An older pgembed's insert function, which queued nothing.
    await sql
      .raw(`create or replace function pgembed_capture_insert() returns trigger
            language plpgsql as $$ begin return null; end $$`)
      .execute(db());
    await sql`update embedding_sources set capture_version = 0`.execute(db());
    await sql`insert into messages (id, content) values (1, 'one')`.execute(db());
    expect(await queuedKeys(db())).toEqual([]);

    expect(await registerSource(db(), DEFAULT_SOURCE, { triggers: true })).toEqual({
      capture: 'triggers',
      changed: false,
    });
    const { rows } = await sql<{ version: number; backfilled: boolean }>`
      select (select capture_version from embedding_sources) as version,
             (select bool_and(backfilled_at is not null) from embedding_targets) as backfilled`.execute(
      db(),
    );
    expect(rows[0]?.version).toBeGreaterThan(0);
    // The old triggers were working: nothing was missed, no target scans again.
    expect(rows[0]?.backfilled).toBe(true);
    await sql`insert into messages (id, content) values (2, 'two')`.execute(db());
    expect(await queuedKeys(db())).toEqual(['small:2']);
  });

  it('lets a second pgembed schema capture the same table without touching the first’s triggers', async () => {
    const own = database;
    await addTarget(own.db, SMALL);
    // A second pgembed schema on the same database, embedding public.messages
    // too (its tables copied from the first's, as its migrations would make them).
    await sql`create schema b`.execute(own.db);
    for (const table of [
      'embedding_sources',
      'embedding_targets',
      'embedding_queue',
      'message_embeddings',
    ]) {
      await sql`create table ${sql.id('b', table)} (like ${sql.id('public', table)} including all)`.execute(
        own.db,
      );
    }
    const shared: MessageSource = { ...DEFAULT_SOURCE, table: 'public.messages' };
    const inSchemaB = <R>(fn: (db: Kysely<DB>) => Promise<R>): Promise<R> =>
      own.db.connection().execute(async (conn) => {
        await sql`set search_path = b`.execute(conn);
        try {
          return await fn(conn);
        } finally {
          await sql`reset search_path`.execute(conn);
        }
      });
    const queuedInB = async () => {
      const { rows } = await sql<{ id: string }>`
        select message_id::text as id from b.embedding_queue order by message_id`.execute(own.db);
      return rows.map((r) => r.id);
    };

    expect(await inSchemaB((db) => registerSource(db, shared, { triggers: true }))).toEqual({
      capture: 'triggers',
      changed: true,
    });
    await sql`insert into b.embedding_targets (provider, model) values ('openai', 'small')`.execute(
      own.db,
    );
    expect(await captureTriggers(own.db, 'messages')).toEqual(
      [...ALL_TRIGGERS, ...triggersOf('b')].sort(),
    );
    await sql`insert into messages (id, content) values (1, 'one')`.execute(own.db);
    expect(await queuedKeys(own.db)).toEqual(['small:1']);
    expect(await queuedInB()).toEqual(['1']);

    // The second schema turns its capture off: the first's goes on.
    expect(await inSchemaB((db) => registerSource(db, shared, { triggers: false }))).toEqual({
      capture: 'reconcile',
      changed: true,
    });
    expect(await captureTriggers(own.db, 'messages')).toEqual(ALL_TRIGGERS);
    await sql`insert into messages (id, content) values (2, 'two')`.execute(own.db);
    expect(await queuedKeys(own.db)).toEqual(['small:1', 'small:2']);
    expect(await queuedInB()).toEqual(['1']);
    // And the first, registered again, finds its triggers in place.
    expect(await registerSource(own.db, DEFAULT_SOURCE, { triggers: true })).toEqual({
      capture: 'triggers',
      changed: false,
    });
  });

  /**
   * A LISTEN connection of the test's own, on the wake-up channel and a
   * barrier channel. `since()` returns the wake-ups sent since its last call:
   * notifications reach a listener in commit order, so once our own barrier
   * notification (sent after the writes committed) has arrived, every
   * wake-up they sent has too.
   */
  async function listen(): Promise<{ since(): Promise<string[]>; end(): Promise<void> }> {
    const BARRIER = 'pgembed_test_barrier';
    const wakes: string[] = [];
    const barriers = new Map<string, () => void>();
    const listener = new pg.Client({ connectionString: target.url });
    await listener.connect();
    listener.on('notification', (message) => {
      if (message.channel === WAKE_CHANNEL) wakes.push(message.payload ?? '');
      if (message.channel === BARRIER) barriers.get(message.payload ?? '')?.();
    });
    await listener.query(`listen ${WAKE_CHANNEL}`);
    await listener.query(`listen ${BARRIER}`);
    return {
      async since() {
        const token = randomBytes(8).toString('hex');
        const arrived = new Promise<void>((resolve) => barriers.set(token, resolve));
        await sql`select pg_notify(${BARRIER}, ${token})`.execute(db());
        await arrived;
        barriers.delete(token);
        return wakes.splice(0);
      },
      end: () => listener.end(),
    };
  }

  it.runIf(backend === 'postgres')(
    'wakes listeners when a change finds no older one waiting, with the schema as payload',
    async () => {
      const listener = await listen();
      cleanups.push(() => listener.end());
      const wakesSinceLast = () => listener.since();
      const { rows } = await sql<{ schema: string }>`select current_schema() as schema`.execute(
        db(),
      );
      const schema = rows[0]?.schema;
      expect(schema).toBe('public');

      // No target: nothing is enqueued, and no one is woken.
      await sql`insert into messages (id, content) values (1, 'one')`.execute(db());
      expect(await wakesSinceLast()).toEqual([]);

      await addTarget(db(), SMALL);
      await sql`insert into messages (id, content) values (2, 'two')`.execute(db());
      expect(await wakesSinceLast()).toEqual([schema]);

      // 2 is still waiting: whoever was woken for it will find these too.
      await sql`insert into messages (id, content) values (3, 'three')`.execute(db());
      await sql`update messages set content = 'two, edited' where id = 2`.execute(db());
      await sql`update messages set content = 'one, edited' where id = 1`.execute(db());
      expect(await queuedKeys(db())).toEqual(['small:1', 'small:2', 'small:3']);
      expect(await wakesSinceLast()).toEqual([]);

      // Nothing enqueued: no wake-up, even with no change waiting.
      await sql`update embedding_queue set claimed_by = 1`.execute(db());
      await sql`update messages set role = 'user'`.execute(db());
      await sql`delete from messages where id = 3`.execute(db());
      expect(await wakesSinceLast()).toEqual([]);

      // Every waiting change is claimed: a new one wakes a listener.
      await sql`insert into messages (id, content) values (4, 'four')`.execute(db());
      expect(await wakesSinceLast()).toEqual([schema]);

      // A change backing off is not waiting to be claimed either.
      await sql`update embedding_queue set not_before = now() + interval '1 hour'
                where message_id = 4`.execute(db());
      await sql`update messages set content = 'two, edited again' where id = 2`.execute(db());
      expect(await wakesSinceLast()).toEqual([schema]);

      // 4 waits again: no wake-up for 5; but a target with no change waiting
      // is woken for.
      await sql`update embedding_queue set not_before = null`.execute(db());
      await sql`insert into messages (id, content) values (5, 'five')`.execute(db());
      expect(await wakesSinceLast()).toEqual([]);
      await addTarget(db(), LARGE);
      await sql`insert into messages (id, content) values (6, 'six')`.execute(db());
      expect(await wakesSinceLast()).toEqual([schema]);

      // Several statements in one transaction: one wake-up.
      await sql`delete from embedding_queue`.execute(db());
      await db()
        .transaction()
        .execute(async (trx) => {
          await sql`insert into messages (id, content) values (7, 'seven')`.execute(trx);
          await sql`insert into messages (id, content) values (8, 'eight')`.execute(trx);
        });
      expect(await wakesSinceLast()).toEqual([schema]);
    },
  );
});
