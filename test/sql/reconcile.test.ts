import { type Kysely, sql } from 'kysely';
import { beforeAll, describe, expect, it } from 'vitest';
import { type Database, openDatabase } from '../../src/db/connect.js';
import { readEmbeddingColumnType } from '../../src/db/embedding-column.js';
import { migrateToLatest } from '../../src/db/migrator.js';
import type { MessageSource } from '../../src/db/names.js';
import type { DB } from '../../src/db/schema.js';
import { type ClaimedMessage, type ClaimScope, claimBatch } from '../../src/sql/queue.js';
import { ChunkSizer, type ReconcileCounts, reconcile } from '../../src/sql/reconcile.js';
import { backends, createTestDatabase } from '../support/db.js';
import { explainInstead, rawSqlIncludes } from '../support/query-hook.js';
import {
  LARGE,
  OTHER,
  QueueFixture,
  SMALL,
  settle,
  sha256,
  useQueueFixture,
  versionsOf,
} from '../support/queue-fixture.js';

/** Runs a scan, keeping the running totals it reports after each chunk. */
async function scan(
  db: Kysely<DB>,
  scope: ClaimScope,
  options: { force?: boolean; retrySkipped?: boolean; stopAfter?: number } = {},
): Promise<{ counts: ReconcileCounts; chunks: ReconcileCounts[] }> {
  const chunks: ReconcileCounts[] = [];
  const counts = await reconcile(db, scope, {
    force: options.force ?? false,
    retrySkipped: options.retrySkipped ?? false,
    chunkSize: 3,
    onChunk: (totals) => {
      chunks.push({ ...totals });
      return options.stopAfter === undefined || chunks.length < options.stopAfter;
    },
  });
  return { counts, chunks };
}

const queued = (...ids: string[]) => Object.fromEntries(ids.map((id) => [id, false]));
const forced = (...ids: string[]) => Object.fromEntries(ids.map((id) => [id, true]));

describe('ChunkSizer', () => {
  it('starts small, then sizes each chunk to take about 50 ms, within 500 and 5,000 ids', () => {
    const sizer = new ChunkSizer();
    const sizes = [sizer.size];
    // ms each chunk took, as a scan beside busy claims might see them.
    for (const ms of [25, 25, 25, 10, 400, 50, 1]) {
      sizer.took(ms);
      sizes.push(sizer.size);
    }
    // ×2 at half the target; at most ×4 at once; 5,000 at most; 500 at least.
    expect(sizes).toEqual([500, 1000, 2000, 4000, 5000, 625, 625, 2500]);
  });
});

describe.each(backends())('the reconciliation scan on %s', (backend) => {
  const queue = useQueueFixture(backend);
  let f: QueueFixture;
  beforeAll(() => {
    f = queue.fixture();
  });

  /**
   * Ten messages, ids 10..100, and what is known of each; chunks of 3 end at
   * 30, 60, 90 and past 100. Orphans (embeddings of ids the source does not
   * have) before the first id, inside a chunk, between two chunks, and past
   * the last id, of several models.
   */
  async function seed(): Promise<ClaimScope> {
    await f.messages([
      ['10', 'ten'], // missing
      ['20', ' \n '], // blank
      ['30', 'thirty'], // up to date
      ['40', 'forty'], // stale
      ['50', 'fifty'], // skipped with this content
      ['60', 'sixty'], // skipped with other content
      ['70', ' \t\n'.repeat(40)], // blank past the 64 characters tested first
      ['80', 'eighty'], // up to date for another model only
      ['90', 'ninety'], // up to date
      ['100', `${' '.repeat(70)}hundred`], // missing: text only after 70 spaces
    ]);
    await f.embedding(SMALL, '30', 'thirty');
    await f.embedding(SMALL, '40', 'forty, as it was');
    await f.embedding(LARGE, '80', 'eighty');
    await f.embedding(SMALL, '90', 'ninety');
    await f.skip(SMALL, '50', 'fifty');
    await f.skip(SMALL, '60', 'sixty, as it was');
    for (const [model, id] of [
      [SMALL, '5'],
      [SMALL, '15'],
      [OTHER, '35'],
      [LARGE, '65'],
      [OTHER, '95'],
      [SMALL, '1000'],
    ] as const) {
      await f.embedding(model, id, 'gone');
    }
    const scope = await f.scope(SMALL);
    // What the triggers queued as the messages arrived is not the scan's.
    await sql`delete from embedding_queue`.execute(f.db);
    await sql`update embedding_targets set backfilled_at = null`.execute(f.db);
    return scope;
  }

  it('enqueues exactly the messages without an embedding of their content, and deletes orphans', async () => {
    const scope = await seed();
    expect(await f.backfilled(scope.targetId)).toBe(false);

    const { counts, chunks } = await scan(f.db, scope);
    expect(counts).toEqual({
      scanned: 10,
      enqueued: 5,
      blank: 2,
      upToDate: 2,
      skippedBefore: 1,
      orphansDeleted: 6,
    });
    expect(chunks.map((c) => [c.scanned, c.orphansDeleted])).toEqual([
      [3, 2],
      [6, 3],
      [9, 4],
      [10, 6],
    ]);
    expect(await f.queue(scope.targetId)).toEqual(queued('10', '40', '60', '80', '100'));
    expect(await f.embeddings()).toEqual(['large:80', 'small:30', 'small:40', 'small:90']);
    expect(await f.backfilled(scope.targetId)).toBe(true);

    // Again: the same messages (already queued), no orphans left.
    expect((await scan(f.db, scope)).counts).toEqual({ ...counts, orphansDeleted: 0 });
    expect(await f.queue(scope.targetId)).toEqual(queued('10', '40', '60', '80', '100'));
  });

  it('enqueues what was skipped with the same content only when asked to retry', async () => {
    const scope = await seed();
    const { counts } = await scan(f.db, scope, { retrySkipped: true });
    expect(counts).toMatchObject({ scanned: 10, enqueued: 6, skippedBefore: 0 });
    expect(await f.queue(scope.targetId)).toEqual(queued('10', '40', '50', '60', '80', '100'));
  });

  it('enqueues every non-blank message, forced, with force', async () => {
    const scope = await seed();
    await scan(f.db, scope);
    // A queued row someone holds stays theirs; it is only marked forced.
    await sql`update embedding_queue set claimed_by = ${scope.runId} where message_id = 10`.execute(
      f.db,
    );

    const { counts } = await scan(f.db, scope, { force: true });
    expect(counts).toEqual({
      scanned: 10,
      enqueued: 8,
      blank: 2,
      upToDate: 2,
      skippedBefore: 0,
      orphansDeleted: 0,
    });
    const all = forced('10', '30', '40', '50', '60', '80', '90', '100');
    expect(await f.queue(scope.targetId)).toEqual(all);
    const { rows } = await sql<{ by: string | null }>`
      select claimed_by::text as by from embedding_queue where message_id = 10`.execute(f.db);
    expect(rows).toEqual([{ by: scope.runId }]);

    // A later scan without force does not take the force back.
    await scan(f.db, scope);
    expect(await f.queue(scope.targetId)).toEqual(all);
  });

  it('leaves other targets’ queues alone', async () => {
    const scope = await seed();
    const large = await f.scope(LARGE);
    await scan(f.db, scope);
    expect(await f.queue(large.targetId)).toEqual({});
    expect(await f.backfilled(large.targetId)).toBe(false);
  });

  it('deletes orphans past the last id when the source ends on a chunk’s end', async () => {
    const scope = await seed();
    await sql`delete from messages where id = 100`.execute(f.db);
    const { counts, chunks } = await scan(f.db, scope);
    // Three full chunks, then one past 90 that finds no message.
    expect(chunks.map((c) => c.scanned)).toEqual([3, 6, 9, 9]);
    expect(counts).toMatchObject({ scanned: 9, enqueued: 4, orphansDeleted: 6 });
    expect(await f.embeddings()).toEqual(['large:80', 'small:30', 'small:40', 'small:90']);
  });

  it('deletes every embedding when the source is empty', async () => {
    const scope = await f.scope(SMALL);
    for (const [model, id] of [
      [SMALL, '1'],
      [SMALL, '2'],
      [LARGE, '1'],
      [OTHER, '7'],
    ] as const) {
      await f.embedding(model, id, 'gone');
    }
    const { counts, chunks } = await scan(f.db, scope);
    expect(counts).toEqual({
      scanned: 0,
      enqueued: 0,
      blank: 0,
      upToDate: 0,
      skippedBefore: 0,
      orphansDeleted: 4,
    });
    expect(chunks).toHaveLength(1);
    expect(await f.embeddings()).toEqual([]);
    expect(await f.backfilled(scope.targetId)).toBe(true);
  });

  it.runIf(backend === 'postgres')(
    'refuses to claim for a run where the database is not one session',
    async () => {
      const scope = await seed();
      await expect(
        reconcile(f.db, scope, {
          force: false,
          retrySkipped: false,
          claims: { room: () => 10, put: () => {} },
        }),
      ).rejects.toThrow('a scan claims for its run only where the database is one session');
    },
  );

  // One session: PGlite (ClaimSink).
  it.runIf(backend === 'pglite')(
    "claims what it queues for the run beside it, within the run's room, and hands it over as read",
    async () => {
      const scope = await seed();
      // Queued already (by a trigger, say): left for the queue's claims.
      await sql`insert into embedding_queue (target_id, message_id)
              values (${scope.targetId}, 10)`.execute(f.db);
      const handed: ClaimedMessage[] = [];
      const sizes: number[] = [];
      const counts = await reconcile(f.db, scope, {
        force: false,
        retrySkipped: false,
        chunkSize: 3,
        // Room for one message a chunk; from the fifth chunk none (the run
        // has stopped taking): queued unclaimed.
        claims: { room: () => (sizes.length < 4 ? 1 : 0), put: (c) => handed.push(...c) },
        onChunk: (totals) => {
          sizes.push(totals.scanned);
          return true;
        },
      });
      // A chunk reads about the ids that fill the room at the last chunk's
      // share wanted: [10] (wanted), [20] (blank, none), then 3 ids at most.
      expect(sizes).toEqual([1, 2, 5, 8, 10]);
      expect(counts).toMatchObject({ scanned: 10, enqueued: 5, blank: 2, upToDate: 2 });
      expect(handed.map((m) => m.id)).toEqual(['40', '60']);
      expect(handed[0]).toEqual({
        id: '40',
        version: expect.any(String),
        exists: true,
        content: 'forty',
        sha256Hex: sha256('forty').toString('hex'),
        nonBlank: true,
        current: false,
        force: false,
      });
      const { rows } = await sql<{ id: string; claimed: boolean; version: string }>`
      select message_id::text as id, claimed_by = ${scope.runId} as claimed, xmin::text as version
      from embedding_queue where target_id = ${scope.targetId} order by message_id`.execute(f.db);
      // 80 is past the room of its chunk (60 filled it); 100 came once there was none.
      expect(rows.map((r) => [r.id, r.claimed])).toEqual([
        ['10', null],
        ['40', true],
        ['60', true],
        ['80', null],
        ['100', null],
      ]);
      expect(handed.map((m) => m.version)).toEqual([rows[1]?.version, rows[2]?.version]);
      // The fence takes the versions the scan read.
      const settled = await settle(f.db, scope, {
        unchanged: ['40', '60'],
        versions: versionsOf(handed),
      });
      expect(settled.ids).toEqual(new Set(['40', '60']));
      expect(await f.queue(scope.targetId)).toEqual(queued('10', '80', '100'));
    },
  );

  it('stops when told to after a chunk, leaving the target to scan again', async () => {
    const scope = await seed();
    const { counts } = await scan(f.db, scope, { stopAfter: 1 });
    expect(counts).toMatchObject({ scanned: 3, enqueued: 1, orphansDeleted: 2 });
    expect(await f.queue(scope.targetId)).toEqual(queued('10'));
    expect(await f.embeddings()).toContain('small:1000');
    expect(await f.backfilled(scope.targetId)).toBe(false);
  });

  it("reads a chunk's messages by the source's index on statistics never gathered, as right after a bulk load", async () => {
    await sql`insert into messages (id, content)
              select g, 'message ' || g from generate_series(1, 50000) g`.execute(f.db);
    const scope = await f.scope(SMALL);
    // The chunk's statement explained, not run; its counts made up, and the scan stopped.
    const counts = { scanned: 0, enqueued: 0, blank: 0, upToDate: 0, skippedBefore: 0 };
    const { plugin: explain, plans } = explainInstead(rawSqlIncludes('Neither test'), [
      { ...counts, orphansDeleted: 0 },
    ]);
    await reconcile(f.db.withPlugin(explain), scope, {
      force: false,
      retrySkipped: false,
      chunkSize: 1000,
      onChunk: () => false,
    });
    expect(plans).toHaveLength(1);
    expect(plans[0]).toMatch(/Index Scan (using|on) messages_pkey/);
    expect(plans[0]).not.toMatch(/Seq Scan on messages/);
  });

  it('scans a source with uuid ids', async () => {
    const own = await createTestDatabase(backend);
    let uuidDb: Database | undefined;
    try {
      uuidDb = await openDatabase(own.url);
      const source: MessageSource = { table: 'docs', idColumn: 'doc_id', textColumn: 'body' };
      // A nullable text column: a NULL text is a blank message.
      await sql`create table docs (doc_id uuid primary key, body text)`.execute(uuidDb.db);
      await migrateToLatest(uuidDb, { warn() {}, source });
      const u = new QueueFixture(
        uuidDb.db,
        await readEmbeddingColumnType(uuidDb.db),
        source,
        'uuid',
        backend === 'pglite',
      );
      const id = (n: number) => `00000000-0000-4000-8000-${n.toString(16).padStart(12, '0')}`;
      await u.messages([
        [id(0x10), 'sixteen'],
        [id(0x20), null],
        [id(0x30), 'forty-eight'],
        [id(0x40), 'sixty-four'],
        [id(0x50), '  '],
        [id(0xa0), 'a hundred and sixty'],
        [id(0xb0), 'a hundred and seventy-six'],
      ]);
      await u.embedding(SMALL, id(0x30), 'forty-eight');
      await u.embedding(SMALL, id(0x40), 'sixty-four, as it was');
      for (const n of [0x1, 0x35, 0x60, 0x1000]) await u.embedding(SMALL, id(n), 'gone');
      const scope = await u.scope(SMALL);
      await sql`delete from embedding_queue`.execute(uuidDb.db);

      const { counts, chunks } = await scan(uuidDb.db, scope);
      expect(chunks.map((c) => c.scanned)).toEqual([3, 6, 7]);
      expect(counts).toEqual({
        scanned: 7,
        enqueued: 4,
        blank: 2,
        upToDate: 1,
        skippedBefore: 0,
        orphansDeleted: 4,
      });
      expect(await u.queue(scope.targetId)).toEqual(queued(id(0x10), id(0x40), id(0xa0), id(0xb0)));
      expect(await u.embeddings()).toEqual([`small:${id(0x30)}`, `small:${id(0x40)}`]);

      // The queue's keyset and fence take uuids too.
      const claimed = await claimBatch(uuidDb.db, scope, {
        after: id(0x10),
        limit: 2,
        ignoreBackoff: false,
      });
      expect(claimed.map((c) => c.id)).toEqual([id(0x40), id(0xa0)]);
      const settled = await settle(uuidDb.db, scope, {
        unchanged: claimed.map((c) => c.id),
        versions: versionsOf(claimed),
      });
      expect(settled.ids).toEqual(new Set([id(0x40), id(0xa0)]));
      expect(await u.queue(scope.targetId)).toEqual(queued(id(0x10), id(0xb0)));
    } finally {
      await uuidDb?.close();
      await own.drop();
    }
  });
});
