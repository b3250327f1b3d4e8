import { sql } from 'kysely';
import { beforeAll, describe, expect, it } from 'vitest';
import { DEFAULT_SOURCE } from '../../src/db/names.js';
import { vectorLiteral } from '../../src/db/vector.js';
import {
  analyzeQueueIfStale,
  type ClaimScope,
  claimBatch,
  claimOldest,
  clearBackoff,
  ensureTarget,
  queueState,
  releaseDeadClaims,
  releaseRunClaims,
} from '../../src/sql/queue.js';
import { reconcile } from '../../src/sql/reconcile.js';
import { backends, openMigrated } from '../support/db.js';
import {
  LARGE,
  type QueueFixture,
  range,
  SMALL,
  settle,
  sha256,
  useQueueFixture,
  versionsOf,
  waitFor,
} from '../support/queue-fixture.js';

const sha256Hex = (text: string) => sha256(text).toString('hex');

describe.each(backends())('the change queue on %s', (backend) => {
  const queue = useQueueFixture(backend);
  const db = () => queue.database().db;
  let f: QueueFixture;
  beforeAll(() => {
    f = queue.fixture();
  });

  const holders = (targetId: number) => f.holders(targetId);
  const ids = (rows: Array<{ id: string }>) => rows.map((r) => r.id);
  const claimFirst = (scope: ClaimScope) => f.claimFirst(scope);

  describe('claimBatch', () => {
    it('claims in id order and reads each message as it is now', async () => {
      const scope = await f.scope(SMALL);
      const other = await f.scope(LARGE);
      // Inserted out of order; the triggers queue each for both targets.
      await f.messages([
        [6, 'six'],
        [1, 'one'],
        [3, 'three'],
        [2, ' \n\t'],
        [4, 'four'],
        [5, 'five'],
      ]);
      await f.embedding(SMALL, 3, 'three');
      await f.embedding(SMALL, 4, 'four, as it was');
      // An embedding of another model says nothing about this one's.
      await f.embedding(LARGE, 1, 'one');
      await sql`update embedding_queue set force = true
                where target_id = ${scope.targetId} and message_id = 5`.execute(db());
      // A queued message that is gone since.
      await sql`insert into embedding_queue (target_id, message_id)
                values (${scope.targetId}, 99)`.execute(db());

      const claimed = await claimFirst(scope);
      // One claim statement: one version, the claim's own, on every row.
      expect(new Set(claimed.map((c) => c.version)).size).toBe(1);
      expect(claimed.map(({ version: _version, ...read }) => read)).toEqual([
        {
          id: '1',
          exists: true,
          content: 'one',
          sha256Hex: sha256Hex('one'),
          nonBlank: true,
          current: false,
          force: false,
        },
        {
          id: '2',
          exists: true,
          content: ' \n\t',
          sha256Hex: sha256Hex(' \n\t'),
          nonBlank: false,
          current: false,
          force: false,
        },
        {
          id: '3',
          exists: true,
          content: 'three',
          sha256Hex: sha256Hex('three'),
          nonBlank: true,
          current: true,
          force: false,
        },
        {
          id: '4',
          exists: true,
          content: 'four',
          sha256Hex: sha256Hex('four'),
          nonBlank: true,
          current: false,
          force: false,
        },
        {
          id: '5',
          exists: true,
          content: 'five',
          sha256Hex: sha256Hex('five'),
          nonBlank: true,
          current: false,
          force: true,
        },
        {
          id: '6',
          exists: true,
          content: 'six',
          sha256Hex: sha256Hex('six'),
          nonBlank: true,
          current: false,
          force: false,
        },
        {
          id: '99',
          exists: false,
          content: null,
          sha256Hex: null,
          nonBlank: false,
          current: false,
          force: false,
        },
      ]);
      const mine = scope.runId;
      expect(await holders(scope.targetId)).toEqual({
        '1': mine,
        '2': mine,
        '3': mine,
        '4': mine,
        '5': mine,
        '6': mine,
        '99': mine,
      });
      const { rows } = await sql<{ n: number }>`
        select count(*)::int as n from embedding_queue
        where claimed_by is not null and claimed_at is null`.execute(db());
      expect(rows[0]?.n).toBe(0);
      // The other target's rows are its own: untouched, and still all there.
      expect(Object.values(await holders(other.targetId))).toEqual(['', '', '', '', '', '']);

      // Nothing is claimed twice.
      expect(
        await claimBatch(db(), scope, { after: null, limit: 10, ignoreBackoff: false }),
      ).toEqual([]);
    });

    it('hashes what it read as the database does, so a scan finds its embedding current', async () => {
      const scope = await f.scope(SMALL);
      const texts = [
        'plain ascii',
        'naïve café, Ünïcödé',
        '日本語のテキスト',
        'emoji 🎉👩‍👩‍👧 and a combining e\u0301',
        'tabs\tand\r\nnewlines',
        `${'long '.repeat(20_000)}end`,
      ];
      await f.messages(texts.map((text, i) => [i + 1, text]));
      const claimed = await claimFirst(scope);
      const { rows } = await sql<{ id: string; sha: string }>`
        select id::text as id, encode(sha256(convert_to(content, 'UTF8')), 'hex') as sha
        from messages order by id`.execute(db());
      expect(claimed.map((c) => [c.id, c.sha256Hex])).toEqual(rows.map((r) => [r.id, r.sha]));
      // One claim statement, one version on all its rows: the fence settles them.
      expect(new Set(claimed.map((c) => c.version)).size).toBe(1);
      const settled = await settle(db(), scope, {
        unchanged: claimed.map((c) => c.id),
        versions: versionsOf(claimed),
      });
      expect(settled.ids.size).toBe(texts.length);
    });

    it('claims at most limit rows, after the keyset only', async () => {
      const scope = await f.scope(SMALL);
      await f.messages(range(1, 8).map((id) => [id, `message ${id}`]));

      const first = await claimBatch(db(), scope, { after: null, limit: 3, ignoreBackoff: false });
      expect(ids(first)).toEqual(['1', '2', '3']);
      const later = await claimBatch(db(), scope, { after: '5', limit: 2, ignoreBackoff: false });
      expect(ids(later)).toEqual(['6', '7']);
      expect(await claimBatch(db(), scope, { after: '8', limit: 5, ignoreBackoff: false })).toEqual(
        [],
      );
      // From the start again: what the keyset stepped over, not what is held.
      const rest = await claimBatch(db(), scope, { after: null, limit: 5, ignoreBackoff: false });
      expect(ids(rest)).toEqual(['4', '5', '8']);
    });

    it('leaves rows backing off unless told to ignore the backoff', async () => {
      const scope = await f.scope(SMALL);
      await f.messages(range(1, 4).map((id) => [id, `message ${id}`]));
      await sql`update embedding_queue set not_before = now() + interval '1 hour'
                where message_id in (1, 3)`.execute(db());
      await sql`update embedding_queue set not_before = now() - interval '1 second'
                where message_id = 4`.execute(db());
      expect(await queueState(db(), scope.targetId, scope.runId)).toEqual({
        due: 2,
        claimedByOthers: 0,
        backingOff: 2,
      });

      const due = await claimBatch(db(), scope, { after: null, limit: 10, ignoreBackoff: false });
      expect(ids(due)).toEqual(['2', '4']);
      const all = await claimBatch(db(), scope, { after: null, limit: 10, ignoreBackoff: true });
      expect(ids(all)).toEqual(['1', '3']);
    });

    it('claimOldest takes the oldest change first, due backoff rows by their change too', async () => {
      const scope = await f.scope(SMALL);
      await f.messages(range(1, 6).map((id) => [id, `message ${id}`]));
      // Changed in the order 5, 2, 6, 1, 3, 4 (a late commit gets a low id an
      // old change); 3 backs off for an hour, 1 is due again.
      const order = [5, 2, 6, 1, 3, 4];
      for (const [k, id] of order.entries()) {
        await sql`update embedding_queue set changed_at = now() - ${`${60 - k} seconds`}::interval
                  where message_id = ${id}`.execute(db());
      }
      await sql`update embedding_queue set not_before = now() + interval '1 hour', attempts = 1
                where message_id = 3`.execute(db());
      await sql`update embedding_queue set not_before = now() - interval '1 second', attempts = 1
                where message_id = 1`.execute(db());

      // Each page in id order (the fence locks in that order), the pages oldest first.
      expect(ids(await claimOldest(db(), scope, 3))).toEqual(['2', '5', '6']);
      expect(ids(await claimOldest(db(), scope, 3))).toEqual(['1', '4']);
      expect(await claimOldest(db(), scope, 3)).toEqual([]);
      expect(await holders(scope.targetId)).toMatchObject({ '3': '' });
    });

    it('analyzes the queue when its statistics are far behind it, and only then', async () => {
      const scope = await f.scope(SMALL);
      // Deterministic: no autovacuum analyze may land in between.
      await sql`alter table embedding_queue set (autovacuum_enabled = false)`.execute(db());
      try {
        await sql`analyze embedding_queue`.execute(db());
        // Queue rows straight in, as a bulk load leaves them: no ANALYZE since.
        await sql`insert into embedding_queue (target_id, message_id)
                  select ${scope.targetId}, g from generate_series(1, 3000) g`.execute(db());
        const estimate = async () => {
          const { rows } = await sql<{ n: number }>`
            select reltuples::float8 as n from pg_class where oid = 'embedding_queue'::regclass`.execute(
            db(),
          );
          return rows[0]?.n ?? 0;
        };
        expect(await estimate()).toBeLessThan(1500);
        // Too few pending rows to matter: left to autovacuum.
        expect(await analyzeQueueIfStale(db(), 3000, 5000)).toBe(false);
        expect(await estimate()).toBeLessThan(1500);
        expect(await analyzeQueueIfStale(db(), 3000, 1000)).toBe(true);
        expect(await estimate()).toBeGreaterThanOrEqual(1500);
        // Caught up: not again.
        expect(await analyzeQueueIfStale(db(), 3000, 1000)).toBe(false);
      } finally {
        await sql`alter table embedding_queue reset (autovacuum_enabled)`.execute(db());
      }
    });

    it('reads a claimed row’s embedding by its key, however stale the statistics', async () => {
      const scope = await f.scope(SMALL);
      // As a backfill finds it: the table analyzed while empty, filled since.
      await sql`alter table message_embeddings set (autovacuum_enabled = false)`.execute(db());
      try {
        await sql`analyze message_embeddings`.execute(db());
        await sql`
          insert into message_embeddings
            (provider, model, message_id, embedding, dimensions, content_sha256, input_tokens)
          select ${SMALL.provider}, ${SMALL.model}, g,
            ${vectorLiteral([1, 2, 3], f.columnType)}::${sql.raw(f.columnType)},
            3, sha256(''::bytea), 1
          from generate_series(1, 3000) g`.execute(db());
        await sql`insert into embedding_queue (target_id, message_id)
                  select ${scope.targetId}, g from generate_series(2001, 2010) g`.execute(db());
        const fetched = await db()
          .transaction()
          .execute(async (trx) => {
            const claimed = await claimBatch(trx, scope, {
              after: null,
              limit: 10,
              ignoreBackoff: false,
            });
            expect(claimed.map((c) => c.id)).toHaveLength(10);
            const { rows } = await sql<{ n: number }>`
              select coalesce(idx_tup_fetch, 0)::int as n from pg_stat_xact_user_tables
              where relname = 'message_embeddings'`.execute(trx);
            return rows[0]?.n ?? 0;
          });
        // A probe a claimed row (dead versions left by earlier tests may add a
        // few); a merge join read all 3,000 (9 ms a claim at 10,000).
        expect(fetched).toBeLessThan(100);
      } finally {
        await sql`alter table message_embeddings reset (autovacuum_enabled)`.execute(db());
      }
    });

    it('never gives two runs the same row', async () => {
      const runs = [await f.scope(SMALL)];
      for (let i = 0; i < 3; i++) runs.push({ ...runs[0]!, runId: await f.run(SMALL) });
      await f.messages(range(1, 60).map((id) => [id, `message ${id}`]));

      // Each run claims until it finds nothing; all at once.
      const claimed = await Promise.all(
        runs.map(async (scope) => {
          const mine: string[] = [];
          for (;;) {
            const batch = await claimBatch(db(), scope, {
              after: null,
              limit: 4,
              ignoreBackoff: false,
            });
            if (batch.length === 0) return mine;
            mine.push(...ids(batch));
          }
        }),
      );
      const every = claimed.flat();
      expect(new Set(every).size).toBe(every.length);
      expect(every.map(Number).sort((a, b) => a - b)).toEqual(range(1, 60));
      // And the queue says the same of who holds what.
      const held = await holders(runs[0]!.targetId);
      runs.forEach((scope, i) => {
        for (const id of claimed[i]!) expect(held[id]).toBe(scope.runId);
      });
    });

    it.runIf(backend === 'postgres')(
      'skips the rows another transaction is claiming, without waiting for it',
      async () => {
        const a = await f.scope(SMALL);
        const b = { ...a, runId: await f.run(SMALL) };
        await f.messages(range(1, 6).map((id) => [id, `message ${id}`]));

        const [first, second] = await db()
          .transaction()
          .execute(async (trx) => {
            const first = await claimBatch(trx, a, { after: null, limit: 3, ignoreBackoff: false });
            // Another connection of the pool, while this transaction holds its rows.
            const second = await claimBatch(db(), b, {
              after: null,
              limit: 10,
              ignoreBackoff: false,
            });
            return [first, second];
          });
        expect(ids(first)).toEqual(['1', '2', '3']);
        expect(ids(second)).toEqual(['4', '5', '6']);
        expect(await holders(a.targetId)).toEqual({
          '1': a.runId,
          '2': a.runId,
          '3': a.runId,
          '4': b.runId,
          '5': b.runId,
          '6': b.runId,
        });
      },
    );
  });

  describe('ensureTarget', () => {
    it.runIf(backend === 'postgres')(
      'makes a new target only once writers already in flight have committed, so its first scan sees their rows',
      async () => {
        const writer = await openMigrated(queue.url());
        try {
          let made: Promise<unknown> | undefined;
          let madeEarly = false;
          await writer.db.transaction().execute(async (trx) => {
            // Written before the target exists: its trigger queues nothing for it.
            await sql`insert into messages (id, content) values (1, 'in flight')`.execute(trx);
            made = ensureTarget(db(), SMALL.provider, SMALL.model, DEFAULT_SOURCE).then(() => {
              madeEarly = true;
            });
            // The new target waits for this transaction (a SHARE lock on messages).
            await waitFor(async () => {
              if (madeEarly) return true;
              const { rows } = await sql<{ n: number }>`
                select count(*)::int as n from pg_locks
                where relation = 'messages'::regclass and mode = 'ShareLock' and not granted`.execute(
                db(),
              );
              return (rows[0]?.n ?? 0) > 0;
            });
            expect(madeEarly, 'the target was made while a writer was in flight').toBe(false);
          });
          await made;
          // Made after the writer committed: the first scan finds its row.
          const scope = await f.scope(SMALL);
          const counts = await reconcile(db(), scope, { force: false, retrySkipped: false });
          expect(counts.enqueued).toBe(1);
        } finally {
          await writer.close();
        }
      },
    );
  });

  describe('a target deleted by hand', () => {
    it('takes its own queue rows with it, once per statement, and leaves the others’', async () => {
      const small = await f.scope(SMALL);
      const large = await f.scope(LARGE);
      await f.messages(range(1, 3).map((id) => [id, `message ${id}`]));
      expect(Object.keys(await f.queue(small.targetId))).toEqual(['1', '2', '3']);
      // No key checks each queued row against its target (migration 0009):
      // a trigger on the target's delete does what ON DELETE CASCADE did.
      await sql`delete from embedding_targets where id = ${small.targetId}`.execute(db());
      expect(await f.queue(small.targetId)).toEqual({});
      expect(Object.keys(await f.queue(large.targetId))).toEqual(['1', '2', '3']);
      const { rows } = await sql<{ n: number }>`
        select count(*)::int as n from pg_constraint
        where conrelid = 'embedding_queue'::regclass and contype = 'f'`.execute(db());
      expect(rows[0]?.n).toBe(0);
    });
  });

  describe('releasing claims', () => {
    it('makes deferred rows due at once for an explicit run, and gives back all a run holds', async () => {
      const scope = await f.scope(SMALL);
      const other = { ...scope, runId: await f.run(SMALL) };
      await f.messages(range(1, 4).map((id) => [id, `message ${id}`]));
      await claimBatch(db(), scope, { after: null, limit: 3, ignoreBackoff: false });
      await claimBatch(db(), other, { after: null, limit: 3, ignoreBackoff: false });
      await settle(db(), scope, { deferred: ['1', '2'], deferredError: 'HTTP 503' });
      expect(await queueState(db(), scope.targetId, scope.runId)).toEqual({
        due: 0,
        claimedByOthers: 1,
        backingOff: 2,
      });
      await clearBackoff(db(), scope.targetId);
      expect(await queueState(db(), scope.targetId, scope.runId)).toEqual({
        due: 2,
        claimedByOthers: 1,
        backingOff: 0,
      });
      expect(await releaseRunClaims(db(), other.runId)).toBe(1);
      expect(await releaseRunClaims(db(), scope.runId)).toBe(1);
      expect(Object.values(await holders(scope.targetId))).toEqual(['', '', '', '']);
    });

    it('releases the claims of runs that are no longer running', async () => {
      const live = await f.scope(SMALL);
      const statuses = ['succeeded', 'partial', 'failed', 'interrupted'];
      const dead = [];
      for (const status of statuses) dead.push({ ...live, runId: await f.run(SMALL, status) });
      await f.messages(range(1, 6).map((id) => [id, `message ${id}`]));
      for (const [i, scope] of [live, ...dead].entries()) {
        await sql`update embedding_queue set claimed_by = ${scope.runId}, claimed_at = now()
                  where message_id = ${i + 1}`.execute(db());
      }
      // A run whose row is gone altogether.
      await sql`update embedding_queue set claimed_by = 999999, claimed_at = now()
                where message_id = 6`.execute(db());

      expect(await releaseDeadClaims(db())).toBe(5);
      expect(await holders(live.targetId)).toEqual({
        '1': live.runId,
        '2': '',
        '3': '',
        '4': '',
        '5': '',
        '6': '',
      });
      expect(await releaseDeadClaims(db())).toBe(0);
      expect(await queueState(db(), live.targetId, dead[0]!.runId)).toEqual({
        due: 5,
        claimedByOthers: 1,
        backingOff: 0,
      });
    });
  });
});
