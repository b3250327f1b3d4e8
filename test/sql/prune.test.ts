import { sql } from 'kysely';
import { describe, expect, it } from 'vitest';
import { readEmbeddingColumnType } from '../../src/db/embedding-column.js';
import { DEFAULT_SOURCE } from '../../src/db/names.js';
import { pruneHistory } from '../../src/sql/prune.js';
import { backends, useMigratedDatabase } from '../support/db.js';
import { insertEmbeddings, sha256 } from '../support/queue-fixture.js';

const A = { provider: 'openai', model: 'a' };
const B = { provider: 'openai', model: 'b' };

describe.each(backends())('pruning history on %s', (backend) => {
  const db = useMigratedDatabase(backend);

  async function run(model: typeof A, status: string, daysAgo: number): Promise<string> {
    const { rows } = await sql<{ id: string }>`
      insert into embedding_runs (provider, model, host, pid, status, started_at, heartbeat_at, finished_at)
      values (${model.provider}, ${model.model}, 'h', 1, ${status},
        now() - ${`${daysAgo} days`}::interval, now() - ${`${daysAgo} days`}::interval,
        ${status === 'running' ? null : sql`now() - ${`${daysAgo} days`}::interval`})
      returning id::text`.execute(db().db);
    return rows[0]!.id;
  }
  async function batch(runId: string, batchNo: number, daysAgo: number): Promise<void> {
    await sql`insert into embedding_batches (run_id, batch_no, first_message_id, last_message_id,
        size, embedded, skipped, tokens, attempts, latency_ms, committed_at)
      values (${runId}, ${batchNo}, 1, 4, 4, 4, 0, 40, 1, 5,
        now() - ${`${daysAgo} days`}::interval)`.execute(db().db);
  }
  async function skip(runId: string, id: number, text: string, daysAgo: number): Promise<void> {
    await sql`insert into embedding_skips (run_id, provider, model, message_id, reason, detail,
        created_at, content_sha256)
      values (${runId}, ${A.provider}, ${A.model}, ${id}, 'context_length', 'too long',
        now() - ${`${daysAgo} days`}::interval, ${sha256(text)})`.execute(db().db);
  }
  const ids = async (table: 'embedding_runs' | 'embedding_skips') =>
    (
      await sql<{
        id: string;
      }>`select ${sql.raw(table === 'embedding_runs' ? 'id' : 'message_id')}::text as id
        from ${sql.table(table)} order by 1`.execute(db().db)
    ).rows.map((r) => r.id);

  it('removes old runs, batches and skips, and keeps what is still needed; a rollback keeps all', async () => {
    await sql`insert into messages (id, content) values
      (1, 'one'), (2, 'two'), (3, 'three now')`.execute(db().db);
    const columnType = await readEmbeddingColumnType(db().db);
    // Message 2 was embedded since it was skipped; 1 still was not.
    await insertEmbeddings(db().db, columnType, A, [2], () => 'two');
    const kept = await run(A, 'partial', 40); // holds the skip of 1: still relevant
    const embeddedSince = await run(A, 'partial', 40);
    const editedSince = await run(A, 'partial', 40);
    const latestOfA = await run(A, 'succeeded', 40);
    const runningOfB = await run(B, 'running', 40);
    await skip(kept, 1, 'one', 40);
    await skip(embeddedSince, 2, 'two', 40);
    await skip(editedSince, 3, 'three then', 40);
    for (const r of [kept, embeddedSince, editedSince, latestOfA]) await batch(r, 1, 40);
    await batch(latestOfA, 2, 1);

    // In a transaction rolled back, as --dry-run does: the same counts, nothing gone.
    const dry = await db()
      .db.transaction()
      .execute(async (trx) => {
        const counts = await pruneHistory(trx, DEFAULT_SOURCE, '30 days');
        throw Object.assign(new Error('roll back'), { counts });
      })
      .catch((error: { counts: unknown }) => error.counts);
    expect(await ids('embedding_runs')).toHaveLength(5);

    const pruned = await pruneHistory(db().db, DEFAULT_SOURCE, '30 days');
    expect(pruned).toEqual({ runs: 2, batches: 4, skips: 2, skipsKept: 1 });
    expect(dry).toEqual(pruned);
    expect(await ids('embedding_runs')).toEqual(
      [kept, latestOfA, runningOfB].sort((x, y) => Number(x) - Number(y)),
    );
    expect(await ids('embedding_skips')).toEqual(['1']);
    const batches = await sql<{ run: string; no: number }>`
      select run_id::text as run, batch_no as no from embedding_batches`.execute(db().db);
    // Only the batch younger than the cutoff, of the model's latest run.
    expect(batches.rows).toEqual([{ run: latestOfA, no: 2 }]);
    // A second prune finds nothing more.
    expect(await pruneHistory(db().db, DEFAULT_SOURCE, '30 days')).toEqual({
      runs: 0,
      batches: 0,
      skips: 0,
      skipsKept: 1,
    });
  });
});
