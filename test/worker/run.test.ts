import { readFileSync } from 'node:fs';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sql } from 'kysely';
import pg from 'pg';
import { describe, expect, it } from 'vitest';
import type { FlagValues } from '../../src/config.js';
import { parseVector } from '../../src/db/vector.js';
import { backends } from '../support/db.js';
import {
  backfilledTarget,
  makeRun as makeRunWith,
  sampleTexts,
  seedMessages,
  useWorkerFixture,
  waitFor,
} from '../support/embed-run.js';
import { fakeEmbedding } from '../support/fake-openai.js';
import { queryHook, rawSqlIncludes } from '../support/query-hook.js';

/**
 * Runs the first claim and then throws a connection error, as if its answer
 * was lost with the connection after the claim committed.
 */
function loseFirstClaimAnswer() {
  const lose = {
    lost: 0,
    plugin: queryHook(rawSqlIncludes('set claimed_by = '), async (result) => {
      if (result.rows.length > 0 && lose.lost === 0) {
        lose.lost++;
        throw Object.assign(new Error('Connection terminated unexpectedly'), {
          code: 'ECONNRESET',
        });
      }
      return result;
    }),
  };
  return lose;
}

// text-embedding-3-small, the default model.
const DIMS = 1536;
// ~9,000 cl100k tokens: over the 8,192 limit of OpenAI's embedding models.
const TOO_LONG = 'lorem ipsum dolor sit amet '.repeat(1800);

describe.each(backends())('the embed run on %s', (backend) => {
  const fx = useWorkerFixture(backend, { shuffle: true });
  const ctx = () => fx.ctx();
  const makeRun = (flags: FlagValues = {}) => makeRunWith(ctx(), flags);
  const embed = (flags: FlagValues = {}) => makeRun(flags).run.run();

  const seed = (contents: Array<string | [number, string]>) =>
    seedMessages(fx.database.db, contents);
  const texts = sampleTexts;

  async function storedRows() {
    return fx.database.db
      .selectFrom('message_embeddings')
      .select([
        'message_id',
        sql<string>`embedding::text`.as('embedding'),
        'dimensions',
        'input_tokens',
        'truncated',
        'embedded_at',
      ])
      .orderBy('message_id')
      .execute();
  }
  async function runRow(runId: string) {
    return fx.database.db
      .selectFrom('embedding_runs')
      .selectAll()
      .where('id', '=', runId)
      .executeTakeFirstOrThrow();
  }

  it('stores for each message the provider vector of its own content, even when the server reorders data', async () => {
    const contents = texts(10);
    await seed(contents);
    const outcome = await embed();
    expect(outcome.exitCode).toBe(0);
    expect(outcome.summary.status).toBe('succeeded');
    const rows = await storedRows();
    expect(rows).toHaveLength(10);
    for (const row of rows) {
      const expected = Array.from(
        fakeEmbedding(contents[Number(row.message_id) - 1] as string, DIMS),
      );
      expect(parseVector(row.embedding).map(Math.fround)).toEqual(expected);
      expect(row.dimensions).toBe(DIMS);
    }
  });

  it('pages past every eligible message in one run, which OFFSET paging over the shrinking set would not', async () => {
    // With OFFSET, page 2 would start 8 rows into a set that has already lost
    // its first 8 rows, and so on: about half would be left behind.
    await seed(texts(100));
    const outcome = await embed({ 'batch-size': '8' });
    expect(outcome.summary.embedded).toBe(100);
    expect(await storedRows()).toHaveLength(100);
    expect(fx.fake.stats.inputsEmbedded).toBe(100);
  });

  it('gives back and embeds the rows of a claim whose answer was lost with the connection', async () => {
    // Queued by the triggers, claimed from the queue (not by a first scan).
    await backfilledTarget(fx.database.db);
    await seed(texts(12));
    const lose = loseFirstClaimAnswer();
    const outcome = await makeRunWith(
      { ...ctx(), db: ctx().db.withPlugin(lose.plugin) },
      {},
    ).run.run();
    // The claim committed (its rows are the run's) and then "failed": the run
    // claimed again past them, and must still not end with them undone.
    expect(lose.lost).toBe(1);
    expect(outcome.exitCode).toBe(0);
    expect(outcome.summary.embedded).toBe(12);
    expect(await storedRows()).toHaveLength(12);
    const { rows } = await sql<{ n: number }>`
      select count(*)::int as n from embedding_queue`.execute(fx.database.db);
    expect(rows[0]?.n).toBe(0);
  });

  it.runIf(backend === 'postgres')(
    'claims what was queued after its last claim came back empty, before it may end',
    async () => {
      await seed(texts(4));
      await embed();
      // The rerun's first claim finds nothing; while it then gives back any
      // claims whose answer was lost, an edit commits and is queued.
      const writer = new pg.Client({ connectionString: fx.url });
      await writer.connect();
      let edited = false;
      const editMeanwhile = queryHook(
        rawSqlIncludes('update embedding_queue set claimed_by = null, claimed_at = null'),
        async (result) => {
          if (!edited) {
            edited = true;
            await writer.query(`update messages set content = 'edited meanwhile' where id = 2`);
          }
          return result;
        },
      );
      try {
        const outcome = await makeRunWith(
          { ...ctx(), db: ctx().db.withPlugin(editMeanwhile) },
          {},
        ).run.run();
        expect(edited).toBe(true);
        // Exit 0 means nothing was left: the edit is embedded, not left queued.
        expect(outcome.exitCode).toBe(0);
        expect(outcome.summary.embedded).toBe(1);
        const { rows } = await sql<{ n: number }>`
          select count(*)::int as n from embedding_queue`.execute(fx.database.db);
        expect(rows[0]?.n).toBe(0);
      } finally {
        await writer.end();
      }
    },
  );

  it('makes no API call and changes no row on a rerun over unchanged messages', async () => {
    await seed(texts(12));
    await embed();
    const before = await storedRows();
    const requestsBefore = fx.fake.stats.requests;
    const outcome = await embed();
    expect(fx.fake.stats.requests).toBe(requestsBefore);
    expect(outcome.summary).toMatchObject({ embedded: 0, skipped: 0, status: 'succeeded' });
    // The rerun read the (empty) queue the triggers keep, not the table: no scan.
    expect(outcome.summary.reconciled).toBeNull();
    expect(outcome.summary.planned).toBe(0);
    expect(await storedRows()).toEqual(before);
  });

  it('re-embeds exactly the message whose content was edited', async () => {
    await seed(texts(12));
    await embed();
    fx.fake.reset();
    await seed([[5, 'an edited fifth message']]);
    const outcome = await embed();
    expect(outcome.summary.embedded).toBe(1);
    expect([...fx.fake.stats.seen.keys()]).toEqual(['an edited fifth message']);
    const row = (await storedRows()).find((r) => r.message_id === '5');
    expect(parseVector(row!.embedding).map(Math.fround)).toEqual(
      Array.from(fakeEmbedding('an edited fifth message', DIMS)),
    );
  });

  it('re-embeds unchanged messages with --force', async () => {
    await seed(texts(6));
    await embed();
    fx.fake.reset();
    const outcome = await embed({ force: true });
    expect(outcome.summary.embedded).toBe(6);
    expect(fx.fake.stats.inputsEmbedded).toBe(6);
    expect(await storedRows()).toHaveLength(6);
  });

  it('counts blank messages as ineligible and never sends them', async () => {
    await seed(['real text', '   ', '\n\t', 'more text']);
    const outcome = await embed();
    expect(outcome.summary.embedded).toBe(2);
    expect(outcome.summary.ineligible.blank).toBe(2);
    expect(fx.fake.stats.inputsEmbedded).toBe(2);
    const run = await runRow(outcome.summary.runId);
    expect(run.ineligible_blank).toBe(2);
  });

  it('takes on at most --limit eligible messages', async () => {
    await seed(texts(20));
    const outcome = await embed({ limit: '7' });
    expect(outcome.summary.embedded).toBe(7);
    expect((await storedRows()).map((r) => r.message_id)).toEqual([
      '1',
      '2',
      '3',
      '4',
      '5',
      '6',
      '7',
    ]);
  });

  it('in strict mode commits every message before an over-long one, then fails naming it, its tokens and the limit', async () => {
    const contents = texts(10);
    contents[5] = TOO_LONG; // message 6, in the second batch of 4
    await seed(contents);
    const outcome = await embed();
    expect(outcome.exitCode).toBe(1);
    expect(outcome.summary.status).toBe('failed');
    expect(outcome.error?.message).toMatch(
      /^message 6 cannot be embedded \(context_length\): \d{4} tokens, over the 8192-token limit.*--allow-partial/,
    );
    expect((await storedRows()).map((r) => r.message_id)).toEqual(['1', '2', '3', '4', '5']);
    // Counted before sending: the long input never cost an API call, and
    // nothing after it, which the run would not keep, was sent either.
    expect(fx.fake.stats.seen.has(TOO_LONG)).toBe(false);
    for (const text of contents.slice(6)) expect(fx.fake.stats.seen.has(text)).toBe(false);
    const run = await runRow(outcome.summary.runId);
    expect(run).toMatchObject({ status: 'failed', embedded: 5 });
    expect(run.error).toContain('message 6');
  });

  it('in partial mode skips only the over-long message, records why, embeds its batch-mates and exits 2', async () => {
    const contents = texts(10);
    contents[5] = TOO_LONG;
    await seed(contents);
    const outcome = await embed({ 'allow-partial': true });
    expect(outcome.exitCode).toBe(2);
    expect(outcome.summary).toMatchObject({
      status: 'partial',
      embedded: 9,
      skipped: 1,
      skippedByReason: { context_length: 1 },
    });
    expect((await storedRows()).map((r) => r.message_id)).not.toContain('6');
    const skips = await fx.database.db.selectFrom('embedding_skips').selectAll().execute();
    expect(skips).toHaveLength(1);
    expect(skips[0]).toMatchObject({
      message_id: '6',
      reason: 'context_length',
      run_id: outcome.summary.runId,
    });
    expect(skips[0]?.detail).toMatch(/over the 8192-token limit/);
  });

  it.for(['openai', 'openai-legacy', 'vllm', 'tei', 'ollama', 'litellm'] as const)(
    'isolates an input the %s server refuses as too long and embeds its batch-mates',
    async (dialect) => {
      // An unknown model has no known limit, so only the server's answer tells.
      Object.assign(fx.fake.options, { dialect, maxInputTokens: 50, models: ['my-local-model'] });
      const contents = texts(8);
      contents[2] = 'long '.repeat(80);
      await seed(contents);
      const outcome = await embed({
        'allow-partial': true,
        model: 'my-local-model',
        'batch-size': '8',
      });
      fx.fake.options.models = undefined;
      expect(outcome.summary).toMatchObject({
        embedded: 7,
        skipped: 1,
        skippedByReason: { context_length: 1 },
      });
      const rows = await storedRows();
      expect(rows.map((r) => r.message_id)).toEqual(['1', '2', '4', '5', '6', '7', '8']);
      if (dialect === 'openai') {
        // The index in the message names the culprit: one failed request, one retry without it.
        expect(fx.fake.stats.requests).toBe(2);
      }
    },
  );

  it('retries a transient failure and records the attempts on the batch', async () => {
    await seed(texts(4));
    fx.fake.enqueueFault(
      { kind: 'server-error', status: 503 },
      { kind: 'rate-limit', retryAfterMs: 10 },
    );
    const outcome = await embed();
    expect(outcome.summary).toMatchObject({
      status: 'succeeded',
      embedded: 4,
      retries: 2,
      requests: 3,
    });
    const batch = await fx.database.db
      .selectFrom('embedding_batches')
      .selectAll()
      .executeTakeFirstOrThrow();
    expect(batch.attempts).toBe(3);
  });

  it('fails a strict run when retries run out; in partial mode defers the batch to the queue, never skips it', async () => {
    await seed(texts(4));
    fx.fake.enqueueFault(...Array.from({ length: 3 }, () => ({ kind: 'server-error' as const })));
    const strict = await embed({ 'max-retries': '2' });
    expect(strict.exitCode).toBe(1);
    expect(strict.error?.message).toMatch(/retries_exhausted/);

    fx.fake.enqueueFault(...Array.from({ length: 3 }, () => ({ kind: 'server-error' as const })));
    const partial = await embed({ 'max-retries': '2', 'allow-partial': true });
    expect(partial.exitCode).toBe(2);
    expect(partial.summary).toMatchObject({
      status: 'partial',
      skipped: 0,
      deferred: 4,
      skippedByReason: {},
    });
    // A transient failure is not a verdict on the messages: they wait in the
    // queue with the attempt counted and the error, and the next run embeds them.
    const { rows } = await sql<{ n: number; attempts: number; error: string }>`
      select count(*)::int as n, min(attempts) as attempts, min(last_error) as error
      from embedding_queue`.execute(fx.database.db);
    expect(rows[0]).toMatchObject({ n: 4, attempts: 1 });
    expect(rows[0]?.error).toMatch(/500|server/i);
    const next = await embed({ 'allow-partial': true });
    expect(next.summary).toMatchObject({ status: 'succeeded', embedded: 4, deferred: 0 });
  });

  it('stops a partial run with exit 1 once 3 batches in a row exhaust their retries, leaving every message pending and none skipped', async () => {
    await seed(texts(40));
    fx.fake.enqueueFault(...Array.from({ length: 100 }, () => ({ kind: 'server-error' as const })));
    const outcome = await embed({
      'max-retries': '1',
      'allow-partial': true,
      concurrency: '1',
    });
    expect(outcome.exitCode).toBe(1);
    expect(outcome.error?.message).toMatch(
      /^the provider is failing: 3 batches in a row exhausted their retries with nothing embedded/,
    );
    // Two attempts for each of the three batches; nothing after the third.
    expect(fx.fake.stats.requests).toBe(6);
    expect(outcome.summary).toMatchObject({ status: 'failed', skipped: 0, deferred: 12 });
    const { rows } = await sql<{ n: number; attempted: number }>`
      select count(*)::int as n, count(*) filter (where attempts > 0)::int as attempted
      from embedding_queue`.execute(fx.database.db);
    expect(rows[0]).toEqual({ n: 40, attempted: 12 });
  });

  it.for([
    [
      'a bad API key',
      {
        kind: 'status',
        status: 401,
        body: { error: { message: 'Incorrect API key', code: 'invalid_api_key' } },
      },
    ],
    ['an exhausted quota', { kind: 'insufficient-quota' }],
    [
      'an unknown model',
      {
        kind: 'status',
        status: 404,
        body: { error: { message: 'model not found', code: 'model_not_found' } },
      },
    ],
  ] as const)('aborts at once on %s, even in partial mode', async ([, fault]) => {
    await seed(texts(8));
    fx.fake.enqueueFault(fault);
    const outcome = await embed({ 'allow-partial': true, concurrency: '1' });
    expect(outcome.exitCode).toBe(1);
    expect(outcome.summary.status).toBe('failed');
    expect(fx.fake.stats.requests).toBe(1);
    expect(await storedRows()).toHaveLength(0);
  });

  it('on a fatal error keeps what the other batches in flight already got, and stops', async () => {
    await seed(texts(40));
    fx.fake.enqueueFault({ kind: 'insufficient-quota' });
    const outcome = await embed({ 'allow-partial': true, concurrency: '4' });
    expect(outcome.exitCode).toBe(1);
    expect(outcome.summary.status).toBe('failed');
    // At most the three other batches in flight went out; nothing after the failure.
    expect(fx.fake.stats.requests).toBeLessThanOrEqual(4);
    const rows = await storedRows();
    expect(rows.length).toBeLessThanOrEqual(12);
    expect((await runRow(outcome.summary.runId)).embedded).toBe(rows.length);
  });

  it('never stores a vector with a non-finite value, and skips only the input it belongs to', async () => {
    await seed(texts(4));
    fx.fake.enqueueFault({ kind: 'nan' });
    const outcome = await embed({ 'allow-partial': true });
    const rows = await storedRows();
    for (const row of rows) expect(parseVector(row.embedding).every(Number.isFinite)).toBe(true);
    expect(outcome.summary).toMatchObject({
      embedded: 3,
      skipped: 1,
      skippedByReason: { invalid_response: 1 },
    });
  });

  it('rejects a response with the wrong count and recovers the batch by splitting it', async () => {
    await seed(texts(4));
    fx.fake.enqueueFault({ kind: 'wrong-count' });
    const outcome = await embed();
    expect(outcome.summary).toMatchObject({ status: 'succeeded', embedded: 4 });
  });

  it('embeds the first tokens of an over-long input with --truncate and marks it', async () => {
    await seed(['short one', TOO_LONG]);
    const outcome = await embed({ truncate: true });
    expect(outcome.summary).toMatchObject({ status: 'succeeded', embedded: 2, truncated: 1 });
    const row = (await storedRows()).find((r) => r.message_id === '2');
    expect(row).toMatchObject({ truncated: true });
    expect(row!.input_tokens).toBeLessThanOrEqual(8192);
    expect(outcome.summary.truncated).toBe(1);
  });

  it('writes a manifest with counts and skipped ids by reason, replacing the file whole', async () => {
    const contents = texts(6);
    contents[1] = TOO_LONG;
    await seed(contents);
    const file = join(await mkdtemp(join(tmpdir(), 'pgembed-manifest-')), 'run.json');
    await embed({ 'allow-partial': true, manifest: file });
    const manifest = JSON.parse(readFileSync(file, 'utf8'));
    expect(manifest).toMatchObject({
      status: 'partial',
      embedded: 5,
      skipped: 1,
      skippedIds: { context_length: ['2'] },
    });
    expect(manifest.runId).toMatch(/^\d+$/);
  });

  it('keeps batches, run counts and stored rows in agreement', async () => {
    const contents = texts(30);
    contents[10] = TOO_LONG;
    await seed(contents);
    const outcome = await embed({ 'allow-partial': true, 'batch-size': '7' });
    const { rows } = await sql<{ embedded: number; skipped: number; n: number }>`
      select sum(b.embedded)::int as embedded, sum(b.skipped)::int as skipped, count(*)::int as n
      from embedding_batches b where b.run_id = ${outcome.summary.runId}`.execute(fx.database.db);
    const run = await runRow(outcome.summary.runId);
    expect(rows[0]).toEqual({ embedded: 29, skipped: 1, n: 5 });
    expect(run).toMatchObject({
      embedded: 29,
      skipped: 1,
      batches: 5,
      status: 'partial',
    });
    expect(await storedRows()).toHaveLength(29);
  });

  it('shows the run in the progress view', async () => {
    await seed(texts(8));
    const outcome = await embed();
    const view = await sql<Record<string, unknown>>`
      select * from embedding_progress where run_id = ${outcome.summary.runId}`.execute(
      fx.database.db,
    );
    expect(view.rows[0]).toMatchObject({
      status: 'succeeded',
      planned: 8,
      embedded: 8,
      skipped: 0,
      remaining: 0,
    });
    expect(Number(view.rows[0]?.percent)).toBe(100);
  });

  it("analyzes the queue at a heartbeat once an application's bulk load has left its statistics far behind", async () => {
    const db = fx.database.db;
    const estimate = async () =>
      (
        await sql<{ n: number }>`select reltuples::float8 as n from pg_class
          where oid = to_regclass('embedding_queue')`.execute(db)
      ).rows[0]?.n ?? 0;
    // A watcher with nothing to do yet; the provider holds every request, so
    // the queue keeps what the load puts there. Autovacuum is off on the
    // test server and PGlite has none: only the run can analyze.
    const held = fx.fake.hold();
    const { run } = makeRunWith(ctx(), { watch: true }, { progressIntervalMs: 20 });
    const finished = run.run();
    await waitFor(async () => {
      const target = await db
        .selectFrom('embedding_targets')
        .select('backfilled_at')
        .executeTakeFirst();
      return target?.backfilled_at != null;
    });
    expect(await estimate()).toBeLessThan(10_000);
    // 12,000 messages in one transaction, each queued by the capture trigger.
    // Their counts reach the statistics at its commit, not 1-10 s after.
    await db.transaction().execute(async (trx) => {
      await sql`select pg_stat_force_next_flush()`.execute(trx);
      await sql`insert into messages (id, content)
                select g, 'bulk ' || g from generate_series(1, 12000) g`.execute(trx);
    });
    await waitFor(async () => (await estimate()) >= 10_000);
    run.stop('SIGTERM');
    held.release();
    expect((await finished).exitCode).toBe(143);
  });

  it('on stop commits the batches answered or in flight, sends nothing more, marks the run interrupted, and tolerates a second stop', async () => {
    // 10 batches of 4, up to 4 in flight. The first request to arrive is
    // answered; every later one is held at the server, so the stop lands at a
    // known point: one batch answered, the next four in flight, five unsent.
    await seed(texts(40));
    let arrived = 0;
    const later = fx.fake.hold(() => ++arrived > 1);
    const { run } = makeRun({ concurrency: '4' });
    const finished = run.run();
    await fx.fake.until((stats) => stats.replies === 1 && stats.held === 4);
    run.stop('SIGTERM');
    run.stop('SIGINT');
    expect(fx.fake.stats.requests).toBe(5);
    later.release();
    const outcome = await finished;
    expect(outcome.exitCode).toBe(143);
    expect(outcome.summary.status).toBe('interrupted');
    // Nothing was sent after the stop: the batches read ahead never went out.
    expect(fx.fake.stats.requests).toBe(5);
    expect(fx.fake.stats.replies).toBe(5);
    expect(fx.fake.stats.seen.size).toBe(20);
    // Committed: exactly the five batches sent before the stop, the answered
    // one and the four in flight, each whole.
    const sent = texts(40)
      .map((text, i) => ({ id: String(i + 1), text }))
      .filter(({ text }) => fx.fake.stats.seen.get(text) === 1)
      .map(({ id }) => id);
    const rows = await storedRows();
    expect(rows.map((r) => String(r.message_id)).sort()).toEqual(sent.sort());
    expect((await runRow(outcome.summary.runId)).embedded).toBe(20);
    expect(outcome.summary.embedded).toBe(20);
  });
});
