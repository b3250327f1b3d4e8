import { sql } from 'kysely';
import { describe, expect, it } from 'vitest';
import { DEFAULT_SOURCE } from '../../src/db/source.js';
import { LeaseLostError } from '../../src/errors.js';
import {
  advanceRange,
  claimRange,
  finishRange,
  openSweep,
  type RangeKey,
  releaseRange,
} from '../../src/sql/ranges.js';
import { insertRun } from '../../src/sql/runs.js';
import { commitBatch } from '../../src/worker/commit.js';
import { backends } from '../support/db.js';
import { sampleTexts, seedMessages, useWorkerFixture } from '../support/embed-run.js';

const TARGET = {
  provider: 'openai',
  model: 'text-embedding-3-small',
  force: false,
  source: DEFAULT_SOURCE,
};

describe.each(backends())('range leases on %s', (backend) => {
  const fx = useWorkerFixture(backend);
  const db = () => fx.database.db;
  const newRun = () =>
    insertRun(db(), { ...TARGET, options: { lease_ms: 1000 }, planned: 0, blank: 0 });
  const ranges = (sweepId: string) =>
    db()
      .selectFrom('embedding_ranges')
      .select([
        'range_no',
        sql<string | null>`lo_id::text`.as('lo'),
        sql<string | null>`hi_id::text`.as('hi'),
        'planned',
        'state',
        sql<string | null>`lease_owner::text`.as('owner'),
        sql<string | null>`cursor_id::text`.as('cursor'),
      ])
      .where('sweep_id', '=', sweepId)
      .orderBy('range_no')
      .execute();

  /** One committed batch of `ids` (tokens 5 each) for run `runId` in `range`, as the pipeline builds it. */
  function batchFor(range: RangeKey, ids: string[], leaseMs: number) {
    const batch = {
      runId: range.runId,
      provider: TARGET.provider,
      model: TARGET.model,
      batchNo: 1,
      firstMessageId: ids[0] as string,
      lastMessageId: ids.at(-1) as string,
      size: ids.length,
      tokens: 5 * ids.length,
      attempts: 1,
      retries: 0,
      latencyMs: 1,
      cursorId: ids.at(-1) as string,
    };
    const rows = ids.map((messageId) => ({
      messageId,
      vector: new Float32Array(1536).fill(0.2),
      sha256Hex: 'ab'.repeat(32),
      inputTokens: 5,
      truncated: false,
    }));
    const to = {
      db: db(),
      columnType: fx.ctx().columnType,
      copyFromBlob: fx.ctx().copyFromBlob,
      range,
      leaseMs,
      idType: 'bigint' as const,
    };
    return { to, batch, rows };
  }

  it('plans ranges of --range-size eligible messages that cover every id, and shares one open sweep', async () => {
    // Ids with a gap, and a blank message that is never eligible.
    await seedMessages(db(), [
      [1, 'a'],
      [2, 'b'],
      [3, '  '],
      [10, 'c'],
      [11, 'd'],
      [50, 'e'],
    ]);
    const runA = await newRun();
    const sweep = await openSweep(db(), TARGET, { rangeSize: 2, runId: runA });
    expect(sweep).toMatchObject({ planned: 5, ranges: 3, created: true });
    expect(await ranges(sweep.id)).toMatchObject([
      { range_no: 0, lo: null, hi: '2', planned: 2, state: 'pending' },
      { range_no: 1, lo: '2', hi: '11', planned: 2 },
      // The last range has no end: ids inserted later belong to it.
      { range_no: 2, lo: '11', hi: null, planned: 1 },
    ]);
    const runB = await newRun();
    expect(await openSweep(db(), TARGET, { rangeSize: 2, runId: runB })).toMatchObject({
      id: sweep.id,
      created: false,
    });
    // A different model is a different sweep.
    const other = await openSweep(
      db(),
      { ...TARGET, model: 'other' },
      { rangeSize: 2, runId: runB },
    );
    expect(other.id).not.toBe(sweep.id);
  });

  it('chains ranges in id order, each starting where the one before ends, however many there are', async () => {
    await seedMessages(db(), sampleTexts(25));
    const run = await newRun();
    const sweep = await openSweep(db(), TARGET, { rangeSize: 2, runId: run });
    const planned = await ranges(sweep.id);
    expect(planned).toHaveLength(13);
    expect(planned.map((r) => r.hi)).toEqual([
      ...Array.from({ length: 12 }, (_, i) => String(2 * (i + 1))),
      null,
    ]);
    for (const [i, range] of planned.entries()) {
      expect(range.lo).toBe(i === 0 ? null : planned[i - 1]?.hi);
    }
    expect(planned.reduce((sum, r) => sum + r.planned, 0)).toBe(25);
  });

  it('gives workers claiming at once different ranges, and hands a released range out again at once', async () => {
    await seedMessages(db(), sampleTexts(6));
    const [runA, runB] = [await newRun(), await newRun()];
    const sweep = await openSweep(db(), TARGET, { rangeSize: 2, runId: runA });
    const claims = await Promise.all([
      claimRange(db(), { sweepId: sweep.id, runId: runA, leaseMs: 60_000 }),
      claimRange(db(), { sweepId: sweep.id, runId: runB, leaseMs: 60_000 }),
    ]);
    expect(new Set(claims.map((c) => c?.rangeNo)).size).toBe(2);
    const a = claims[0];
    if (!a) throw new Error('no claim');
    await releaseRange(db(), { sweepId: sweep.id, rangeNo: a.rangeNo, runId: runA }, '1');
    const again = await claimRange(db(), { sweepId: sweep.id, runId: runB, leaseMs: 60_000 });
    // The lowest free range: the one just released, resuming after its cursor.
    expect(again).toMatchObject({ rangeNo: a.rangeNo, cursorId: '1', takenFrom: null });
  });

  it('takes over a lapsed lease from its committed cursor and marks the silent run abandoned', async () => {
    await seedMessages(db(), sampleTexts(4));
    const [dead, alive] = [await newRun(), await newRun()];
    const sweep = await openSweep(db(), TARGET, { rangeSize: 10, runId: dead });
    const lease = await claimRange(db(), { sweepId: sweep.id, runId: dead, leaseMs: 1000 });
    const key = { sweepId: sweep.id, rangeNo: 0, runId: dead };
    await db()
      .transaction()
      .execute((trx) =>
        advanceRange(trx, key, { cursorId: '2', embedded: 2, skipped: 0, leaseMs: 1000 }),
      );
    expect(await claimRange(db(), { sweepId: sweep.id, runId: alive, leaseMs: 1000 })).toBe(
      undefined,
    );
    // The dead worker's lease and heartbeat lapse.
    await sql`update embedding_ranges set lease_expires_at = now() - interval '1 second'`.execute(
      db(),
    );
    await sql`update embedding_runs set heartbeat_at = now() - interval '5 seconds' where id = ${dead}`.execute(
      db(),
    );
    const taken = await claimRange(db(), { sweepId: sweep.id, runId: alive, leaseMs: 1000 });
    expect(lease?.rangeNo).toBe(0);
    expect(taken).toMatchObject({ rangeNo: 0, cursorId: '2', takenFrom: dead });
    const deadRun = await db()
      .selectFrom('embedding_runs')
      .select('status')
      .where('id', '=', dead)
      .executeTakeFirstOrThrow();
    expect(deadRun.status).toBe('abandoned');

    // The dead worker comes back: its commit writes nothing, and it cannot finish the range.
    const { to, batch, rows } = batchFor(key, ['3'], 1000);
    await expect(commitBatch(to, batch, rows, [])).rejects.toBeInstanceOf(LeaseLostError);
    const stored = await db().selectFrom('message_embeddings').selectAll().execute();
    expect(stored).toHaveLength(0);
    expect(await finishRange(db(), key, '4')).toBe(false);
    expect((await ranges(sweep.id))[0]).toMatchObject({ state: 'leased', owner: alive });
  });

  it('counts a batch once when its transaction is redone after the first COMMIT landed', async () => {
    await seedMessages(db(), sampleTexts(2));
    const run = await newRun();
    const sweep = await openSweep(db(), TARGET, { rangeSize: 10, runId: run });
    await claimRange(db(), { sweepId: sweep.id, runId: run, leaseMs: 60_000 });
    const key = { sweepId: sweep.id, rangeNo: 0, runId: run };
    const { to, batch, rows } = batchFor(key, ['1', '2'], 60_000);
    await commitBatch(to, batch, rows, []);
    await commitBatch(to, batch, rows, []);
    const runRow = await db()
      .selectFrom('embedding_runs')
      .select(['embedded', 'batches', 'tokens'])
      .where('id', '=', run)
      .executeTakeFirstOrThrow();
    expect({ ...runRow, tokens: Number(runRow.tokens) }).toEqual({
      embedded: 2,
      batches: 1,
      tokens: 10,
    });
    const range = await db()
      .selectFrom('embedding_ranges')
      .select(['embedded', sql<string>`cursor_id::text`.as('cursor')])
      .executeTakeFirstOrThrow();
    expect(range).toMatchObject({ embedded: 2, cursor: '2' });
  });
});
