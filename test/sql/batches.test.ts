import { sql } from 'kysely';
import { describe, expect, it } from 'vitest';
import { commitGuard, recordBatch } from '../../src/sql/batches.js';
import { backends, useMigratedDatabase } from '../support/db.js';
import { deferred } from '../support/deferred.js';

// Two sessions, one holding the run's row: a Postgres server only (PGlite has one).
const serverOnly = backends().includes('postgres');

describe.skipIf(!serverOnly)('recording a batch on a Postgres server', () => {
  const db = useMigratedDatabase('postgres');

  it("waits for the run's row, however short the batch's lock_timeout", async () => {
    const { rows } = await sql<{ id: string }>`
      insert into embedding_runs (provider, model, host, pid) values ('p', 'm', 'h', 1)
      returning id::text`.execute(db().db);
    const runId = rows[0]!.id;
    const batch = {
      runId,
      provider: 'p',
      model: 'm',
      batchNo: 1,
      firstMessageId: '1',
      lastMessageId: '8',
      size: 8,
      tokens: 80,
      attempts: 2,
      retries: 1,
      latencyMs: 5,
    };
    // Another of the run's batches, mid-commit, holds the row.
    const holderReleased = deferred();
    const held = deferred();
    const holder = db()
      .db.transaction()
      .execute(async (trx) => {
        await sql`select 1 from embedding_runs where id = ${runId} for update`.execute(trx);
        held.resolve();
        await holderReleased.promise;
      });
    await held.promise;
    const recording = db()
      .db.transaction()
      .execute(async (trx) => {
        // 1 ms: were it still in force at the row, the wait would fail at once.
        await sql`select ${commitGuard(batch, '1ms').lockTimeout}`.execute(trx);
        await recordBatch(trx, batch, { embedded: 7, skipped: 1, truncated: 0 });
      });
    // Seen waiting on the row (a counted condition), or failed: then it gave way.
    const waiting = async () => {
      for (;;) {
        const { rows: waiters } = await sql<{ n: number }>`
          select count(*)::int as n from pg_stat_activity
          where datname = current_database() and wait_event_type = 'Lock'`.execute(db().db);
        if ((waiters[0]?.n ?? 0) > 0) return;
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    };
    try {
      await Promise.race([
        waiting(),
        recording.then(() => {
          throw new Error("recorded while another transaction held the run's row");
        }),
      ]);
    } finally {
      holderReleased.resolve();
      await holder;
    }
    await recording;
    const run = await db()
      .db.selectFrom('embedding_runs')
      .select(['embedded', 'skipped', 'batches', 'requests', 'retries'])
      .where('id', '=', runId)
      .executeTakeFirstOrThrow();
    expect(run).toEqual({ embedded: 7, skipped: 1, batches: 1, requests: 2, retries: 1 });
  });
});
