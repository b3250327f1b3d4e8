import { PGlite } from '@electric-sql/pglite';
import { vector } from '@electric-sql/pglite-pgvector';
import { Kysely, sql } from 'kysely';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { Database } from '../../src/db/connect.js';
import { migrateToLatest } from '../../src/db/migrator.js';
import { DEFAULT_SOURCE } from '../../src/db/names.js';
import { engineCommits } from '../../src/db/pglite-commits.js';
import { PGliteDialect } from '../../src/db/pglite-dialect.js';
import { localEngine } from '../../src/db/pglite-engine.js';
import { PGliteSession } from '../../src/db/pglite-session.js';
import type { DB } from '../../src/db/schema.js';
import { vectorSend } from '../../src/db/vector.js';
import type { BatchRecord } from '../../src/sql/batches.js';
import { type ClaimScope, ensureTarget } from '../../src/sql/queue.js';
import { fakeEmbedding } from '../support/fake-openai.js';
import { settlement } from '../support/queue-fixture.js';

/*
 * The engine's commits, in this thread: three commits asked for in one turn
 * of the event loop are all waiting when the first group starts, so what
 * goes together is known, not raced.
 */
describe("PGlite's thread: commits that wait go together", () => {
  let pglite: PGlite;
  let db: Kysely<DB>;
  let commits: ReturnType<typeof engineCommits>;
  let scope: ClaimScope;

  beforeAll(async () => {
    pglite = await PGlite.create({ extensions: { vector } });
    const engine = localEngine(pglite, new PGliteSession(async () => {}));
    db = new Kysely<DB>({ dialect: new PGliteDialect(engine) });
    await migrateToLatest({ db, describe: 'pglite (memory)' } as Database, { warn: () => {} });
    commits = engineCommits(engine);
  });
  afterAll(async () => {
    await commits?.close();
    await db?.destroy();
    await pglite?.close();
  });

  beforeEach(async () => {
    await sql`delete from messages`.execute(db);
    await sql`delete from embedding_targets`.execute(db);
    await sql`delete from embedding_runs`.execute(db);
    await sql`insert into messages (id, content)
              select g, 'message ' || g from generate_series(1, 12) g`.execute(db);
    const target = await ensureTarget(db, 'openai', 'small');
    const { rows } = await sql<{ id: string }>`
      insert into embedding_runs (provider, model, host, pid, status)
      values ('openai', 'small', 'test-host', 1, 'running') returning id::text as id`.execute(db);
    scope = {
      targetId: target.id,
      runId: rows[0]?.id ?? '',
      provider: 'openai',
      model: 'small',
      source: DEFAULT_SOURCE,
      idType: 'bigint',
      oneSession: true,
    };
    await sql`insert into embedding_queue (target_id, message_id, claimed_by, claimed_at)
              select ${scope.targetId}, g, ${scope.runId}, now()
              from generate_series(1, 12) g`.execute(db);
  });

  /**
   * Batch `n` (1-3): messages 4n-3 .. 4n, each sent its own text's vector;
   * `twice`: its first vector is in it twice, so its COPY breaks the unique key.
   */
  async function batch(n: number, twice = false) {
    const ids = [1, 2, 3, 4].map((k) => String(4 * (n - 1) + k));
    const { rows } = await sql<{ id: string; version: string }>`
      select message_id::text as id, xmin::text as version from embedding_queue
      where message_id = any(${ids}::bigint[])`.execute(db);
    const work = settlement({
      versions: Object.fromEntries(rows.map((r) => [r.id, r.version])),
      embedded: (twice ? [ids[0] ?? '', ...ids] : ids).map((id) => ({
        messageId: id,
        vector: fakeEmbedding(`message ${id}`, 1536),
        sha256Hex: 'ab'.repeat(32),
        inputTokens: 2,
        truncated: false,
      })),
    });
    const record: BatchRecord = {
      runId: scope.runId,
      provider: 'openai',
      model: 'small',
      batchNo: n,
      firstMessageId: ids[0] ?? '',
      lastMessageId: ids[3] ?? '',
      size: 4,
      tokens: 8,
      attempts: 1,
      retries: 0,
      latencyMs: 1,
    };
    return { record, work };
  }
  const commit = ({ record, work }: Awaited<ReturnType<typeof batch>>) =>
    commits.commit('vector', scope, record, work);
  /** Stored vectors' own binary form, by message id; and the transactions that wrote them. */
  async function stored() {
    const { rows } = await sql<{ id: string; sent: Uint8Array; tx: string }>`
      select message_id::text as id, vector_send(embedding) as sent, xmin::text as tx
      from message_embeddings order by message_id`.execute(db);
    return rows;
  }

  it('commits batches that wait together in one transaction, each settled as alone', async () => {
    const batches = [await batch(1), await batch(2), await batch(3)];
    const committed = await Promise.all(batches.map(commit));
    expect(committed.map((c) => c?.embedded)).toEqual([4, 4, 4]);

    const rows = await stored();
    expect(rows.map((r) => r.id)).toEqual(Array.from({ length: 12 }, (_, i) => String(i + 1)));
    // Each row holds the provider's float32s of its own text, to the bit.
    for (const row of rows) {
      const sent = vectorSend(fakeEmbedding(`message ${row.id}`, 1536));
      expect(Buffer.from(row.sent).equals(sent)).toBe(true);
    }
    expect(new Set(rows.map((r) => r.tx)).size).toBe(1);
    const { rows: recorded } = await sql<{ n: number; txs: number }>`
      select count(*)::int as n, count(distinct xmin::text)::int as txs
      from embedding_batches where run_id = ${scope.runId}`.execute(db);
    expect(recorded).toEqual([{ n: 3, txs: 1 }]);
    const { rows: queued } = await sql<{ n: number }>`
      select count(*)::int as n from embedding_queue`.execute(db);
    expect(queued).toEqual([{ n: 0 }]);
  });

  it('commits each alone when one fails, so only that one fails', async () => {
    const batches = [await batch(1), await batch(2, true), await batch(3)];
    const outcomes = await Promise.allSettled(batches.map(commit));
    expect(outcomes.map((o) => o.status)).toEqual(['fulfilled', 'rejected', 'fulfilled']);

    const rows = await stored();
    expect(rows.map((r) => r.id)).toEqual(['1', '2', '3', '4', '9', '10', '11', '12']);
    // Batches 1 and 3 alone: two transactions.
    expect(new Set(rows.map((r) => r.tx)).size).toBe(2);
    // Batch 2's claims are still held, as a failed commit leaves them.
    const { rows: held } = await sql<{ id: string }>`
      select message_id::text as id from embedding_queue
      where claimed_by = ${scope.runId} order by message_id`.execute(db);
    expect(held.map((r) => r.id)).toEqual(['5', '6', '7', '8']);
  });
});
