import { sql } from 'kysely';
import pg from 'pg';
import { describe, expect, it } from 'vitest';
import { ChunkSizer } from '../../src/sql/reconcile.js';
import { BackgroundScan } from '../../src/worker/background-scan.js';
import { backends } from '../support/db.js';
import { deferred } from '../support/deferred.js';
import {
  makeRun,
  sampleTexts,
  seedMessages,
  useWorkerFixture,
  waitFor,
} from '../support/embed-run.js';

describe('BackgroundScan', () => {
  it('wakes a waiter at each chunk and at the end, and keeps a failure rather than throw', async () => {
    const chunks = [deferred(), deferred()];
    let chunkDone = () => {};
    const scan = new BackgroundScan(async (done) => {
      chunkDone = done;
      await chunks[0]?.promise;
      done();
      await chunks[1]?.promise;
      throw new Error('the source went away');
    });
    expect(scan.running).toBe(true);
    const first = scan.nextChunk();
    chunks[0]?.resolve();
    await first;
    expect(scan.running).toBe(true);
    const second = scan.nextChunk();
    expect(second).not.toBe(first);
    chunks[1]?.resolve();
    await second;
    expect(await scan.finished).toBeUndefined();
    expect(scan.running).toBe(false);
    expect(scan.error?.message).toBe('the source went away');
    // Once ended, a wait ends at once rather than hang.
    chunkDone();
    await scan.nextChunk();
  });
});

describe.each(backends())('a model first run on %s', (backend) => {
  const fx = useWorkerFixture(backend);
  // More than the scan's first chunk: the rest comes in a later one.
  const n = ChunkSizer.FIRST + 60;
  const lastId = n;
  const count = async (table: 'message_embeddings' | 'embedding_queue') =>
    Number(
      (
        await sql<{ n: number }>`select count(*)::int as n from ${sql.table(table)}`.execute(
          fx.database.db,
        )
      ).rows[0]?.n,
    );

  it.runIf(backend === 'postgres')(
    'commits batches from the scan first chunks before the scan has ended',
    async () => {
      await seedMessages(fx.database.db, sampleTexts(n));
      // The model's target, not backfilled, with the last message already
      // queued (as the capture trigger does): a transaction of the test's
      // holds that row, so the scan's chunk reaching it waits.
      const db = fx.database.db;
      const { rows } = await sql<{ id: number }>`
        insert into embedding_targets (provider, model)
        values ('openai', 'text-embedding-3-small') returning id`.execute(db);
      const targetId = rows[0]?.id as number;
      await sql`insert into embedding_queue (target_id, message_id)
                values (${targetId}, ${lastId})`.execute(db);
      const holder = new pg.Client({ connectionString: fx.url });
      await holder.connect();
      try {
        await holder.query('begin');
        await holder.query(
          'select 1 from embedding_queue where target_id = $1 and message_id = $2 for update',
          [targetId, lastId],
        );
        const finished = makeRun(fx.ctx()).run.run();
        // Counted, not timed: the first chunk's messages are embedded and
        // committed while the scan is held.
        await waitFor(async () => (await count('message_embeddings')) >= ChunkSizer.FIRST);
        const target = await sql<{ backfilled_at: Date | null }>`
          select backfilled_at from embedding_targets where id = ${targetId}`.execute(db);
        expect(target.rows[0]?.backfilled_at).toBeNull();
        await holder.query('commit');
        const outcome = await finished;
        expect(outcome.exitCode).toBe(0);
        expect(outcome.summary.embedded).toBe(n);
        expect(outcome.summary.planned).toBe(n);
        expect(outcome.summary.reconciled?.scanned).toBe(n);
        expect(await count('message_embeddings')).toBe(n);
        expect(await count('embedding_queue')).toBe(0);
      } finally {
        await holder.end();
      }
    },
  );

  it.runIf(backend === 'pglite')(
    'with --limit, the scan queues the rest of the source while the last batches are still in flight',
    async () => {
      // On PGlite the scan claims for the run, up to its room (64 here), and
      // waits while it holds more than half of that: a reader that stopped at
      // --limit must let it go on, not only once its batches are answered.
      const total = 300;
      await seedMessages(fx.database.db, sampleTexts(total));
      const db = fx.database.db;
      const held = fx.fake.hold();
      const finished = makeRun(fx.ctx(), { limit: '8', concurrency: '2' }).run.run();
      try {
        // Both batches of 4 are at the server, unanswered.
        await fx.fake.until((stats) => stats.held === 2);
        // Counted, not timed: the scan reaches the last message and the
        // target is backfilled while they are held. Before, the scan waited
        // for the reader until the run's batches were done: not met.
        await waitFor(async () => {
          const { rows } = await sql<{ done: boolean }>`
            select backfilled_at is not null as done from embedding_targets`.execute(db);
          return rows[0]?.done === true;
        }, 30_000);
        expect(await count('embedding_queue')).toBe(total);
        expect(await count('message_embeddings')).toBe(0);
      } finally {
        held.release();
      }
      const outcome = await finished;
      expect(outcome.exitCode).toBe(0);
      expect(outcome.summary.embedded).toBe(8);
      expect(await count('message_embeddings')).toBe(8);
      // The rest waits for the next run, claimed by no one.
      const { rows } = await sql<{ n: number; claimed: number }>`
        select count(*)::int as n, count(claimed_by)::int as claimed from embedding_queue`.execute(
        db,
      );
      expect(rows[0]).toEqual({ n: total - 8, claimed: 0 });
    },
  );

  it('fails the run with the scan error, keeps what was committed, and the next run completes it', async () => {
    await seedMessages(fx.database.db, sampleTexts(n));
    const db = fx.database.db;
    // The scan's second chunk fails on the last message.
    await sql`create function pgembed_test_refuse() returns trigger language plpgsql as $$
      begin raise exception 'refused by the test: %', new.message_id; end $$`.execute(db);
    await sql`create trigger pgembed_test_refuse before insert on embedding_queue
      for each row when (new.message_id = ${sql.lit(lastId)})
      execute function pgembed_test_refuse()`.execute(db);
    try {
      const outcome = await makeRun(fx.ctx()).run.run();
      expect(outcome.exitCode).toBe(1);
      expect(outcome.summary.status).toBe('failed');
      expect(outcome.summary.error).toContain(`refused by the test: ${lastId}`);
      // Everything the run reported embedded is stored; nothing is claimed.
      expect(await count('message_embeddings')).toBe(outcome.summary.embedded);
      const held = await sql<{ n: number }>`
        select count(*)::int as n from embedding_queue where claimed_by is not null`.execute(db);
      expect(held.rows[0]?.n).toBe(0);
      const target = await sql<{ backfilled_at: Date | null }>`
        select backfilled_at from embedding_targets`.execute(db);
      expect(target.rows[0]?.backfilled_at).toBeNull();
    } finally {
      await sql`drop trigger pgembed_test_refuse on embedding_queue`.execute(db);
      await sql`drop function pgembed_test_refuse()`.execute(db);
    }
    const again = await makeRun(fx.ctx()).run.run();
    expect(again.exitCode).toBe(0);
    expect(await count('message_embeddings')).toBe(n);
    expect(await count('embedding_queue')).toBe(0);
  });
});
