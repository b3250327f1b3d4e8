import { sql } from 'kysely';
import { beforeAll, describe, expect, it } from 'vitest';
import type { Database } from '../../src/db/connect.js';
import { readEmbeddingColumnType } from '../../src/db/embedding-column.js';
import type { BatchRecord } from '../../src/sql/batches.js';
import { claimBatch, queueState } from '../../src/sql/queue.js';
import { commitBatch } from '../../src/worker/commit.js';
import { backends, openMigrated } from '../support/db.js';
import { fakeEmbedding } from '../support/fake-openai.js';
import { explainInstead, queryHook, rawSqlIncludes } from '../support/query-hook.js';
import {
  OTHER,
  type QueueFixture,
  range,
  SMALL,
  settle,
  sha256,
  useQueueFixture,
  versionsOf,
  waitFor,
} from '../support/queue-fixture.js';

describe.each(backends())("a batch's commit statement on %s", (backend) => {
  const queue = useQueueFixture(backend);
  const db = () => queue.database().db;
  let f: QueueFixture;
  let database: Database;
  beforeAll(() => {
    f = queue.fixture();
    database = queue.database();
  });

  const batchOf = (runId: string, batchNo = 1): BatchRecord => ({
    runId,
    provider: SMALL.provider,
    model: SMALL.model,
    batchNo,
    firstMessageId: '1',
    lastMessageId: '2',
    size: 0,
    tokens: 0,
    attempts: 1,
    retries: 0,
    latencyMs: 1,
  });
  const skipOf = (id: string, content: string) => ({
    messageId: id,
    sha256Hex: sha256(content).toString('hex'),
    reason: 'context_length',
    detail: 'over the limit',
    inputTokens: 9000,
  });
  const timeoutNow = async (trx: typeof database.db) =>
    (await sql<{ t: string }>`select current_setting('lock_timeout') as t`.execute(trx)).rows[0]?.t;

  describe('the fence', () => {
    it('settles only rows this run still holds, at the version its claim left, and gives the rest back', async () => {
      const scope = await f.scope(SMALL);
      const other = { ...scope, runId: await f.run(SMALL) };
      await f.messages(range(1, 6).map((id) => [id, `message ${id}`]));
      await sql`insert into embedding_queue (target_id, message_id)
                values (${scope.targetId}, 98), (${scope.targetId}, 99)`.execute(db());
      const claimed = await f.claimFirst(scope);
      expect(claimed.map((c) => c.id)).toEqual(['1', '2', '3', '4', '5', '6', '98', '99']);
      // 3's version as claimed, for a second try after its edit.
      const versionOf3 = versionsOf(claimed)['3'] ?? '';

      // After the claim: 3 is edited and 4 deleted (their capture triggers
      // update the rows), 5 is taken over by another run (this one stopped
      // beating), 98 appears, 6 is updated with the text it had.
      await sql`update messages set content = 'message 3, edited' where id = 3`.execute(db());
      await sql`delete from messages where id = 4`.execute(db());
      await sql`update embedding_queue set claimed_by = ${other.runId} where message_id = 5`.execute(
        db(),
      );
      await f.messages([[98, 'ninety-eight']]);
      await sql`update messages set content = content where id = 6`.execute(db());

      const settled = await settle(db(), scope, {
        unchanged: ['1', '2', '3', '4', '5', '6', '98', '99'],
        versions: versionsOf(claimed),
      });
      // 6's update left its text as it was: its trigger queued nothing, so
      // it settles. 4's delete took its row (and embeddings) away. 3 and 98
      // changed since the claim: given back, to be claimed again; 5 is the
      // other run's.
      expect([...settled.ids].sort()).toEqual(['1', '2', '6', '99']);
      expect(settled.recorded).toBe(false);
      expect(await f.holders(scope.targetId)).toEqual({ '3': '', '5': other.runId, '98': '' });
      // The version from before the edit settles nothing (and 3 is no
      // longer held); nothing handled, nothing settled.
      await f.claimFirst(scope);
      const again = await settle(db(), scope, { unchanged: ['3'], versions: { '3': versionOf3 } });
      expect(again.ids).toEqual(new Set());
      expect((await settle(db(), scope, {})).ids).toEqual(new Set());
    });

    it('reads no message, and settles only its own batch of what the run holds', async () => {
      const scope = await f.scope(SMALL);
      await f.messages(range(1, 80).map((id) => [id, `message ${id}`]));
      // Ten batches' worth claimed, as with 10 in flight; one batch settles.
      const claimed = await claimBatch(db(), scope, {
        after: null,
        limit: 80,
        ignoreBackoff: false,
      });
      expect(claimed).toHaveLength(80);
      const fetched = await db()
        .transaction()
        .execute(async (trx) => {
          // Read before and after: PostgreSQL 15's "xact" counts may still
          // hold the claim's reads, made on this connection just before.
          const messagesRead = async () =>
            (
              await sql<{ n: number }>`
                select (coalesce(idx_tup_fetch, 0) + coalesce(seq_tup_read, 0))::int as n
                from pg_stat_xact_user_tables where relname = 'messages'`.execute(trx)
            ).rows[0]?.n ?? 0;
          const before = await messagesRead();
          const settled = await settle(trx, scope, {
            unchanged: claimed.slice(0, 8).map((c) => c.id),
            versions: versionsOf(claimed),
          });
          expect(settled.ids).toEqual(new Set(claimed.slice(0, 8).map((c) => c.id)));
          return (await messagesRead()) - before;
        });
      // The fence compares the queue row's version alone. Comparing each
      // message's content hash, it read and hashed 8 texts a batch (3 ms
      // of an 8-email batch's 11 ms on PGlite).
      expect(fetched).toBe(0);
      const held = Object.values(await f.holders(scope.targetId));
      expect(held).toEqual(Array(72).fill(scope.runId));
    });

    it.runIf(backend === 'postgres')(
      'does not settle a message whose edit commits while the statement waits for its row',
      async () => {
        const scope = await f.scope(SMALL);
        await f.messages([[1, 'old']]);
        const [claim] = await f.claimFirst(scope);
        const version = claim?.version ?? '';
        const writer = await openMigrated(queue.url());
        try {
          let settling: ReturnType<typeof settle> | undefined;
          await writer.db.transaction().execute(async (trx) => {
            // The edit's capture trigger holds the queue row until it commits.
            await sql`update messages set content = 'new' where id = 1`.execute(trx);
            settling = settle(db(), scope, { unchanged: ['1'], versions: { '1': version } });
            await waitFor(async () => {
              const { rows } = await sql<{ n: number }>`
                select count(*)::int as n from pg_stat_activity
                where datname = current_database() and wait_event_type = 'Lock'`.execute(db());
              return (rows[0]?.n ?? 0) > 0;
            });
          });
          // The statement saw the edit's version of the row once it could
          // lock it, and gave the row back: the new text is embedded next.
          expect((await settling)?.ids).toEqual(new Set());
          expect(await f.holders(scope.targetId)).toEqual({ '1': '' });
        } finally {
          await writer.close();
        }
      },
    );

    it.runIf(backend === 'postgres')(
      'settles a message edited between the claim and its read, at the version read',
      async () => {
        const scope = await f.scope(SMALL);
        await f.messages([
          [1, 'one'],
          [2, 'two'],
        ]);
        // The edit commits as the claim's answer arrives, before the read.
        const editAfterClaim = queryHook(rawSqlIncludes('set claimed_by = '), async (result) => {
          await sql`update messages set content = 'one, edited' where id = 1`.execute(db());
          return result;
        });
        const claimed = await claimBatch(db().withPlugin(editAfterClaim), scope, {
          after: null,
          limit: 10,
          ignoreBackoff: false,
        });
        // Read after the edit, with the version the edit gave its row: the
        // text sent is the current one, and it settles, sent once. With the
        // claim's own version it was sent twice: 3 texts of a watcher's ~400
        // under a steady writer (test/e2e/watch.test.ts).
        expect(claimed[0]?.content).toBe('one, edited');
        const settled = await settle(db(), scope, {
          unchanged: ['1', '2'],
          versions: versionsOf(claimed),
        });
        expect([...settled.ids].sort()).toEqual(['1', '2']);
      },
    );

    it('settles nothing when its transaction rolls back', async () => {
      const scope = await f.scope(SMALL);
      await f.messages([
        [1, 'one'],
        [2, 'two'],
      ]);
      const claimed = await f.claimFirst(scope);
      const failure = new Error('the batch failed after the statement');
      const outcome = await db()
        .transaction()
        .execute(async (trx) => {
          const settled = await settle(trx, scope, {
            unchanged: claimed.map((c) => c.id),
            versions: versionsOf(claimed),
          });
          expect(settled.ids).toEqual(new Set(['1', '2']));
          throw failure;
        })
        .catch((error: unknown) => error);
      expect(outcome).toBe(failure);
      expect(await f.holders(scope.targetId)).toEqual({ '1': scope.runId, '2': scope.runId });
    });

    it.runIf(backend === 'postgres')(
      'makes an edit committed during the commit wait for it and queue the message afresh',
      async () => {
        const scope = await f.scope(SMALL);
        await f.messages([[1, 'one']]);
        const claimed = await f.claimFirst(scope);
        let edit: Promise<unknown> | undefined;
        await db()
          .transaction()
          .execute(async (trx) => {
            const settled = await settle(trx, scope, {
              unchanged: ['1'],
              versions: versionsOf(claimed),
            });
            expect(settled.ids).toEqual(new Set(['1']));
            edit = sql`update messages set content = 'one, edited' where id = 1`.execute(db());
            // The edit's trigger waits for this transaction's lock on the row.
            // Asked on a connection of its own: within a transaction,
            // pg_stat_activity answers from a snapshot taken at first use.
            const { rows: me } = await sql<{ pid: number }>`
              select pg_backend_pid() as pid`.execute(trx);
            await waitFor(async () => {
              const { rows } = await sql<{ n: number }>`
                select count(*)::int as n from pg_stat_activity
                where datname = current_database()
                  and ${me[0]?.pid ?? 0}::int = any(pg_blocking_pids(pid))
                  and query like 'update messages set content%'`.execute(db());
              return rows[0]?.n === 1;
            });
          });
        await edit;
        const { rows } = await sql<{ claimed_by: string | null }>`
          select claimed_by from embedding_queue where message_id = 1`.execute(db());
        expect(rows).toEqual([{ claimed_by: null }]);
      },
    );
    it("finds the batch's rows by primary key, never by the run's claimed_by entries, which grow with each row it settles", async () => {
      const scope = await f.scope(SMALL);
      // A queue filled unclaimed and analyzed so (the planner believes no
      // row is claimed), then claimed whole by the run, which has settled
      // all but the last 64: PGlite never vacuums, so the claimed_by index
      // still holds an entry for each of the 3,000 rows.
      await sql`insert into embedding_queue (target_id, message_id)
                select ${scope.targetId}, g from generate_series(1, 3000) g`.execute(db());
      await sql`analyze embedding_queue`.execute(db());
      await sql`update embedding_queue set claimed_by = ${scope.runId}, claimed_at = now()`.execute(
        db(),
      );
      await sql`delete from embedding_queue where message_id <= 2936`.execute(db());
      const versions = Object.fromEntries(
        (
          await sql<{ id: string; version: string }>`
            select message_id::text as id, xmin::text as version from embedding_queue`.execute(db())
        ).rows.map((r) => [r.id, r.version]),
      );
      const ids = Object.keys(versions);
      const work = { versions, unchanged: ids.slice(0, 60), deferred: ids.slice(60, 62) };
      // The statement explained, not run.
      const { plugin: explain, plans } = explainInstead(rawSqlIncludes("|| '@' || q.xmin"), []);
      await settle(db().withPlugin(explain), scope, work, { batch: batchOf(scope.runId) });
      expect(plans).toHaveLength(1);
      expect(plans[0]).toContain('embedding_queue_pkey');
      expect(plans[0]).not.toContain('embedding_queue_claimed_by');

      // And it settles: 60 gone from the queue, 2 deferred, 2 still held.
      const settled = await settle(db(), scope, work, { batch: batchOf(scope.runId) });
      expect(settled.ids.size).toBe(60);
      expect(Object.values(await f.holders(scope.targetId))).toEqual([
        '',
        '',
        scope.runId,
        scope.runId,
      ]);
    });
  });

  describe('on a server (a lock timeout and a batch already recorded)', () => {
    it('waits at most its lock_timeout for queue rows, lifts it for the run’s row, and does nothing for a batch already recorded', async () => {
      const scope = await f.scope(SMALL);
      await f.messages(range(1, 4).map((id) => [id, `message ${id}`]));
      const claimed = await f.claimFirst(scope);
      const batch = batchOf(scope.runId);
      const first = await db()
        .transaction()
        .execute(async (trx) => {
          const settled = await settle(
            trx,
            scope,
            {
              skipped: [skipOf('1', 'message 1')],
              unchanged: ['2'],
              versions: versionsOf(claimed),
            },
            { lockTimeout: '1234ms', batch },
          );
          return { ids: settled.ids, timeout: await timeoutNow(trx) };
        });
      // The run's row comes last, with no timeout (batches of a run queue on it).
      expect(first).toEqual({ ids: new Set(['1', '2']), timeout: '0' });
      // The same batch again, as after a commit whose answer was lost: its
      // row is there, so nothing is done, not even for rows it holds (given
      // back by the first, then claimed again by another of its batches).
      const again = await settle(
        db(),
        scope,
        {
          skipped: [skipOf('3', 'message 3')],
          deferred: ['4'],
          released: ['3'],
          versions: versionsOf(claimed),
        },
        { lockTimeout: '200ms', batch },
      );
      expect(again).toEqual({ recorded: true, ids: new Set() });
      expect(await f.holders(scope.targetId)).toEqual({ '3': scope.runId, '4': scope.runId });
      const { rows } = await sql<{ n: number; skips: number; batches: number }>`
        select (select embedded + skipped from embedding_runs where id = ${scope.runId})::int as n,
          (select count(*) from embedding_skips where run_id = ${scope.runId})::int as skips,
          (select count(*) from embedding_batches where run_id = ${scope.runId})::int as batches`.execute(
        db(),
      );
      expect(rows[0]).toEqual({ n: 1, skips: 1, batches: 1 });
      // Only rows given back, and no batch to record: the timeout was set
      // for them (the parts that change the queue set it), and never lifted.
      const nothing = await db()
        .transaction()
        .execute(async (trx) => {
          const settled = await settle(trx, scope, { released: ['4'] }, { lockTimeout: '4321ms' });
          return { ids: settled.ids, timeout: await timeoutNow(trx) };
        });
      expect(nothing).toEqual({ ids: new Set(), timeout: '4321ms' });
      expect(await f.holders(scope.targetId)).toEqual({ '3': scope.runId, '4': '' });
    });

    it.runIf(backend === 'postgres')(
      "gives way at its lock_timeout to an application's lock on a queue row",
      async () => {
        const scope = await f.scope(SMALL);
        await f.messages([
          [1, 'one'],
          [2, 'two'],
        ]);
        const claimed = await f.claimFirst(scope);
        const writer = await openMigrated(queue.url());
        try {
          // As the capture trigger of an edit in flight holds a row: one
          // the fence settles, then one the statement gives back.
          const cases: Array<[string, { unchanged?: string[]; released?: string[] }]> = [
            ['1', { unchanged: ['1'] }],
            ['2', { released: ['2'] }],
          ];
          for (const [id, work] of cases) {
            const error = await writer.db.transaction().execute(async (trx) => {
              await sql`select 1 from embedding_queue where message_id = ${id} for update`.execute(
                trx,
              );
              // Without the lock_timeout in force at the row, this waits for
              // the writer, which waits for it: the test would hang.
              return settle(
                db(),
                scope,
                { ...work, versions: versionsOf(claimed) },
                { lockTimeout: '1ms', batch: batchOf(scope.runId) },
              ).then(
                () => undefined,
                (e: unknown) => e as { code?: string },
              );
            });
            // lock_not_available: withDbRetry redoes the batch.
            expect(error?.code).toBe('55P03');
          }
          expect(await f.holders(scope.targetId)).toEqual({ '1': scope.runId, '2': scope.runId });
        } finally {
          await writer.close();
        }
      },
    );

    it.runIf(backend === 'postgres')(
      "waits for the run's row, however short its lock_timeout for queue rows",
      async () => {
        const scope = await f.scope(SMALL);
        await f.messages([[1, 'one']]);
        const claimed = await f.claimFirst(scope);
        const writer = await openMigrated(queue.url());
        let release = () => {};
        const released = new Promise<void>((resolve) => {
          release = resolve;
        });
        try {
          // Another of the run's batches, mid-commit, holds the row.
          let held = () => {};
          const holding = new Promise<void>((resolve) => {
            held = resolve;
          });
          const holder = writer.db.transaction().execute(async (trx) => {
            await sql`select 1 from embedding_runs where id = ${scope.runId} for update`.execute(
              trx,
            );
            held();
            await released;
          });
          await holding;
          // 1 ms: were it still in force at the run's row, the wait would fail at once.
          const recording = settle(
            db(),
            scope,
            { skipped: [skipOf('1', 'one')], versions: versionsOf(claimed) },
            { lockTimeout: '1ms', batch: { ...batchOf(scope.runId), attempts: 2, retries: 1 } },
          );
          // Seen waiting on the row (a counted condition), or failed: then it gave way.
          const failedEarly = recording.then(
            () => 'recorded',
            (e: unknown) => String(e),
          );
          await waitFor(async () => {
            const { rows } = await sql<{ n: number }>`
              select count(*)::int as n from pg_stat_activity
              where datname = current_database() and wait_event_type = 'Lock'`.execute(db());
            return (rows[0]?.n ?? 0) > 0;
          });
          release();
          await holder;
          expect(await failedEarly).toBe('recorded');
          const run = await db()
            .selectFrom('embedding_runs')
            .select(['embedded', 'skipped', 'batches', 'requests', 'retries'])
            .where('id', '=', scope.runId)
            .executeTakeFirstOrThrow();
          expect(run).toEqual({ embedded: 0, skipped: 1, batches: 1, requests: 2, retries: 1 });
        } finally {
          release();
          await writer.close();
        }
      },
    );
  });

  describe('what a batch writes', () => {
    it('writes vectors, skips and deletions for what settled, gives back the rest, and records the batch', async () => {
      const scope = await f.scope(SMALL);
      await f.messages(range(1, 8).map((id) => [id, `message ${id}`]));
      const claimed = await f.claimFirst(scope);
      // Old embeddings: 1 (replaced), 3 (gone: every model's), 4 (blank: this model's).
      await f.embedding(SMALL, 1, 'message 1, before');
      await f.embedding(SMALL, 3, 'message 3');
      await f.embedding(OTHER, 3, 'message 3');
      await f.embedding(SMALL, 4, 'message 4');
      await f.embedding(OTHER, 4, 'message 4');
      // 8 changes after the claim: handled, then given back.
      await sql`update messages set content = 'message 8, edited' where id = 8`.execute(db());
      const vector = fakeEmbedding('message 1', 1536);
      const committed = await commitBatch(
        {
          db: db(),
          scope,
          writer: database.embeddingWriter(await readEmbeddingColumnType(db()), 'bigint'),
          overConnection: backend === 'postgres',
        },
        { ...batchOf(scope.runId), lastMessageId: '8', attempts: 2, retries: 1 },
        {
          versions: versionsOf(claimed),
          embedded: [
            {
              messageId: '1',
              vector,
              sha256Hex: sha256('message 1').toString('hex'),
              inputTokens: 3,
              truncated: true,
            },
            {
              messageId: '8',
              vector,
              sha256Hex: sha256('message 8').toString('hex'),
              inputTokens: 3,
              truncated: false,
            },
          ],
          skipped: [skipOf('2', 'message 2')],
          gone: ['3'],
          blank: ['4'],
          unchanged: ['5'],
          deferred: ['6'],
          deferredError: 'HTTP 503',
          released: ['7'],
        },
      );
      expect(committed).toMatchObject({
        embedded: 1,
        skipped: 1,
        truncated: 1,
        tokens: 3,
        gone: 1,
        blank: 1,
        unchanged: 1,
        changed: 1,
      });
      expect(await f.embeddings()).toEqual(['minilm:4', 'small:1']);
      const { rows: stored } = await sql<{ sha: string; tokens: number; truncated: boolean }>`
        select encode(content_sha256, 'hex') as sha, input_tokens as tokens, truncated
        from message_embeddings where model = 'small'`.execute(db());
      expect(stored).toEqual([
        { sha: sha256('message 1').toString('hex'), tokens: 3, truncated: true },
      ]);
      const { rows: queue } = await sql<{ id: string; by: string | null; attempts: number }>`
        select message_id::text as id, claimed_by::text as by, attempts from embedding_queue
        order by message_id`.execute(db());
      expect(queue).toEqual([
        { id: '6', by: null, attempts: 1 },
        { id: '7', by: null, attempts: 0 },
        { id: '8', by: null, attempts: 0 },
      ]);
      const { rows: skips } = await sql<{ id: string; reason: string }>`
        select message_id::text as id, reason from embedding_skips`.execute(db());
      expect(skips).toEqual([{ id: '2', reason: 'context_length' }]);
      const batch = await db()
        .selectFrom('embedding_batches')
        .select(['size', 'embedded', 'skipped', 'tokens', 'attempts'])
        .executeTakeFirstOrThrow();
      expect(batch).toEqual({ size: 2, embedded: 1, skipped: 1, tokens: 3, attempts: 2 });
      const run = await db()
        .selectFrom('embedding_runs')
        .select(['embedded', 'skipped', 'truncated', 'tokens', 'batches', 'requests', 'retries'])
        .where('id', '=', scope.runId)
        .executeTakeFirstOrThrow();
      expect({ ...run, tokens: Number(run.tokens) }).toEqual({
        embedded: 1,
        skipped: 1,
        truncated: 1,
        tokens: 3,
        batches: 1,
        requests: 2,
        retries: 1,
      });
    });
  });

  describe('giving claims back', () => {
    it('gives rows back at once, or with a deferral counted and backed off', async () => {
      const scope = await f.scope(SMALL);
      const other = { ...scope, runId: await f.run(SMALL) };
      await f.messages(range(1, 4).map((id) => [id, `message ${id}`]));
      await claimBatch(db(), scope, { after: null, limit: 3, ignoreBackoff: false });
      await claimBatch(db(), other, { after: null, limit: 3, ignoreBackoff: false });
      const rowsOf = async () => {
        const { rows } = await sql<{
          id: string;
          by: string | null;
          claimedAt: boolean;
          attempts: number;
          error: string | null;
          wait: string | null;
        }>`
          select message_id::text as id, claimed_by::text as by, claimed_at is not null as "claimedAt",
                 attempts, last_error as error,
                 extract(epoch from not_before - now())::text as wait
          from embedding_queue order by message_id`.execute(db());
        return rows;
      };
      const defer = (ids: string[], error: string) =>
        db()
          .transaction()
          .execute(async (trx) => {
            // In a transaction, so now() there is the statement's own.
            await settle(trx, scope, { deferred: ids, deferredError: error });
            const { rows } = await sql<{ id: string; wait: string; attempts: number }>`
              select message_id::text as id, attempts,
                     extract(epoch from not_before - now())::int::text as wait
              from embedding_queue where not_before is not null order by message_id`.execute(trx);
            return rows;
          });

      // 4 is the other run's: not released.
      expect(await defer(['1', '2', '4'], 'HTTP 503')).toEqual([
        { id: '1', attempts: 1, wait: '1' },
        { id: '2', attempts: 1, wait: '1' },
      ]);
      expect((await rowsOf()).map(({ wait: _, ...r }) => r)).toEqual([
        { id: '1', by: null, claimedAt: false, attempts: 1, error: 'HTTP 503' },
        { id: '2', by: null, claimedAt: false, attempts: 1, error: 'HTTP 503' },
        { id: '3', by: scope.runId, claimedAt: true, attempts: 0, error: null },
        { id: '4', by: other.runId, claimedAt: true, attempts: 0, error: null },
      ]);
      expect(await queueState(db(), scope.targetId, scope.runId)).toEqual({
        due: 0,
        claimedByOthers: 1,
        backingOff: 2,
      });

      // Deferred again: twice as long. Many times: at most 5 minutes, and
      // past 2^44 seconds too (once out of interval's range).
      await claimBatch(db(), scope, { after: null, limit: 10, ignoreBackoff: true });
      await sql`update embedding_queue set attempts = 44 where message_id = 2`.execute(db());
      expect(await defer(['1', '2'], 'timeout')).toEqual([
        { id: '1', attempts: 2, wait: '2' },
        { id: '2', attempts: 45, wait: '300' },
      ]);

      // Given back plainly: held by no one, the counts kept.
      await settle(db(), scope, { released: ['3'] });
      expect((await rowsOf()).find((r) => r.id === '3')).toEqual({
        id: '3',
        by: null,
        claimedAt: false,
        attempts: 0,
        error: null,
        wait: null,
      });
    });
  });
});
