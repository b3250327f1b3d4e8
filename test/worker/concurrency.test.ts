import { sql } from 'kysely';
import { describe, expect, it } from 'vitest';
import type { FlagValues } from '../../src/config.js';
import { tokenCount } from '../../src/provider/tokens.js';
import { backends } from '../support/db.js';
import {
  makeRun,
  sampleTexts,
  seedMessages,
  useWorkerFixture,
  waitFor,
} from '../support/embed-run.js';

describe.each(backends())('concurrent batches on %s', (backend) => {
  const fx = useWorkerFixture(backend);
  const ctx = () => fx.ctx();
  const embed = (flags: FlagValues) => makeRun(ctx(), flags).run.run();
  const storedCount = async () =>
    (
      await sql<{ n: number }>`select count(*)::int as n from message_embeddings`.execute(
        fx.database.db,
      )
    ).rows[0]?.n ?? 0;

  it.for([1, 4])('keeps %i batches in flight with --concurrency set so', async (concurrency) => {
    await seedMessages(fx.database.db, sampleTexts(48));
    fx.fake.options.latencyMs = 60;
    const outcome = await embed({ concurrency: String(concurrency) });
    expect(outcome.summary).toMatchObject({ status: 'succeeded', embedded: 48 });
    expect(fx.fake.stats.maxInFlight).toBe(concurrency);
  });

  it('commits batches as they finish but moves the cursor only past batches that all committed', async () => {
    const contents = sampleTexts(16);
    contents[0] = 'the slow first message';
    await seedMessages(fx.database.db, contents);
    // Batch 1 is slow; batches 2..4 finish and commit before it.
    fx.fake.failWhenInputContains('the slow first message', { kind: 'hang', ms: 800 });
    const { run } = makeRun(ctx(), { concurrency: '4' });
    const finished = run.run();
    await waitFor(async () => (await storedCount()) >= 12);
    const during = await fx.database.db
      .selectFrom('embedding_runs')
      .select(['cursor_id', 'batches'])
      .executeTakeFirstOrThrow();
    expect(during.batches).toBe(3);
    expect(during.cursor_id).toBeNull();
    const outcome = await finished;
    expect(outcome.summary).toMatchObject({ status: 'succeeded', embedded: 16 });
    const after = await fx.database.db
      .selectFrom('embedding_runs')
      .select('cursor_id')
      .executeTakeFirstOrThrow();
    expect(after.cursor_id).toBe('16');
  });

  it('splits a batch into requests within the per-request input and token caps', async () => {
    const text = (i: number) => `item ${i} ${'alpha beta gamma '.repeat(5)}`;
    const contents = Array.from({ length: 8 }, (_, i) => text(i + 1));
    await seedMessages(fx.database.db, contents);
    const perInput = Math.max(...contents.map(tokenCount));
    await embed({ 'batch-size': '8', 'max-request-inputs': '3' });
    expect(fx.fake.stats.requestSizes).toEqual([3, 3, 2]);

    await sql`truncate message_embeddings, embedding_runs, embedding_sweeps cascade`.execute(
      fx.database.db,
    );
    fx.fake.reset();
    await embed({ 'batch-size': '8', 'max-request-tokens': String(2 * perInput + 1) });
    expect(fx.fake.stats.requestSizes).toEqual([2, 2, 2, 2]);
    expect(await storedCount()).toBe(8);
  });

  it('stays under a server token limit with --max-tpm, where without it the server answers 429', async () => {
    // The server allows 60,000 tokens a minute with a 10-second burst; ~12,000 to send.
    const contents = Array.from({ length: 120 }, (_, i) => `${i} ${'token '.repeat(98)}`);
    await seedMessages(fx.database.db, contents);
    Object.assign(fx.fake.options, { maxTpm: 60_000, maxTpmBurst: 10_000 });
    const unpaced = await embed({ 'batch-size': '10', 'max-retry-wait-ms': '2000' });
    expect(unpaced.summary).toMatchObject({ status: 'succeeded', embedded: 120 });
    expect(fx.fake.stats.rateLimited).toBeGreaterThan(0);
    expect(unpaced.summary.retries).toBe(fx.fake.stats.rateLimited);

    await sql`truncate message_embeddings, embedding_runs, embedding_sweeps cascade`.execute(
      fx.database.db,
    );
    fx.fake.reset(); // a full server bucket again
    const paced = await embed({ 'batch-size': '10', 'max-tpm': '60000' });
    expect(paced.summary).toMatchObject({ status: 'succeeded', embedded: 120 });
    expect(fx.fake.stats.rateLimited).toBe(0);
  });
});
