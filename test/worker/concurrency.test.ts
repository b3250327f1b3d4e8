import { sql } from 'kysely';
import { beforeEach, describe, expect, it, vi } from 'vitest';
import type { FlagValues } from '../../src/config.js';
import { tokenCount } from '../../src/provider/cl100k.js';
import type { RateGateClock, RateGateOptions } from '../../src/worker/rate-gate.js';
import { backends } from '../support/db.js';
import { deferred } from '../support/deferred.js';
import {
  backfilledTarget,
  makeRun,
  sampleTexts,
  seedMessages,
  useWorkerFixture,
  waitFor,
} from '../support/embed-run.js';
import type { FakeOpenAI } from '../support/fake-openai.js';
import { queryHook, rawSqlIncludes } from '../support/query-hook.js';

// The pipeline makes its own rate gate; this lets a test give it a clock.
const gateOptions = vi.hoisted(() => ({ current: {} as RateGateOptions }));
vi.mock('../../src/worker/rate-gate.js', async (importOriginal) => {
  const actual = await importOriginal<typeof import('../../src/worker/rate-gate.js')>();
  return {
    ...actual,
    createRateGate: (limits: Parameters<typeof actual.createRateGate>[0]) =>
      actual.createRateGate(limits, gateOptions.current),
  };
});

/**
 * One virtual clock for the client's rate gate and the fake server's TPM
 * bucket, so that whether pgembed stays under the server's limit is decided
 * by what it sends, not by how fast this machine runs. Virtual time moves only
 * when someone waits:
 * - the gate, for its bucket to refill: first every request it has let
 *   through reaches the server's check, so each is charged at the virtual
 *   moment it was admitted, however long it spent in transit;
 * - a client told to retry after a 429: by the retry-after-ms the server gave
 *   (the client may wait less in real time; the server has moved on as if it
 *   had waited).
 */
function virtualTime(fake: FakeOpenAI) {
  let now = 0;
  let admitted = 0;
  let admittedTokens = 0;
  const clock: RateGateClock = {
    now: () => now,
    async sleep(ms) {
      await fake.until((stats) => stats.rateChecked >= admitted);
      now += ms;
    },
  };
  fake.onReply(({ status, headers }) => {
    if (status === 429) now += Number(headers['retry-after-ms'] ?? 0);
  });
  fake.options.clock = clock;
  gateOptions.current = {
    clock,
    onAdmit: (tokens) => {
      admitted++;
      admittedTokens += tokens;
    },
  };
  return {
    now: () => now,
    admittedTokens: () => admittedTokens,
  };
}

describe.each(backends())('concurrent batches on %s', (backend) => {
  const fx = useWorkerFixture(backend);
  beforeEach(() => {
    gateOptions.current = {};
  });
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
    // The server answers nothing until `concurrency` requests wait there at
    // once: reached whatever the machine's speed, or the test times out.
    const start = fx.fake.hold();
    const finished = embed({ concurrency: String(concurrency) });
    await fx.fake.until((stats) => stats.held === concurrency);
    start.release();
    const outcome = await finished;
    expect(outcome.summary).toMatchObject({ status: 'succeeded', embedded: 48 });
    // And never more, through the whole run.
    expect(fx.fake.stats.maxInFlight).toBe(concurrency);
  });

  it('commits batches as they finish; a slow batch keeps only its own messages claimed until it commits', async () => {
    const contents = sampleTexts(16);
    contents[0] = 'the slow first message';
    await seedMessages(fx.database.db, contents);
    // Batch 1 is held at the server until the test lets it go; batches 2..4
    // finish and commit before it.
    const slow = fx.fake.hold((inputs) => inputs.includes('the slow first message'));
    const { run } = makeRun(ctx(), { concurrency: '4' });
    const finished = run.run();
    await waitFor(async () => (await storedCount()) >= 12);
    expect(slow.held).toBe(1);
    const during = await fx.database.db
      .selectFrom('embedding_runs')
      .select(['id', 'batches'])
      .executeTakeFirstOrThrow();
    expect(during.batches).toBe(3);
    // What is left in the queue is the slow batch, claimed by this run: a
    // crash now would lose it to no one, since eligibility is the resume point.
    const queued = await fx.database.db
      .selectFrom('embedding_queue')
      .select(['message_id', 'claimed_by'])
      .orderBy('message_id')
      .execute();
    expect(queued).toEqual(
      ['1', '2', '3', '4'].map((id) => ({ message_id: id, claimed_by: during.id })),
    );
    slow.release();
    const outcome = await finished;
    expect(outcome.summary).toMatchObject({ status: 'succeeded', embedded: 16 });
    expect(await fx.database.db.selectFrom('embedding_queue').selectAll().execute()).toEqual([]);
  });

  // PGlite has one session: a commit held open holds every query, claims too.
  it.skipIf(backend === 'pglite')(
    'sends the next batch while earlier ones commit, holding at most 2 × concurrency + 1 batches',
    async () => {
      // Claimed from the queue, a batch at a time, by the reader alone.
      await backfilledTarget(fx.database.db);
      await seedMessages(fx.database.db, sampleTexts(20));
      // Every batch's commit is held as its statement answers (it has
      // committed at the server; the run has not heard) until released.
      let committing = 0;
      const threeHeld = deferred();
      const released = deferred();
      const hold = queryHook(rawSqlIncludes("|| '@' || q.xmin"), async (result) => {
        if (++committing === 3) threeHeld.resolve();
        await released.promise;
        return result;
      });
      const finished = makeRun(
        { ...ctx(), db: ctx().db.withPlugin(hold) },
        { concurrency: '1', 'batch-size': '4' },
      ).run.run();
      // With one send slot, batches 2 and 3 went out while 1 and 2 committed.
      await threeHeld.promise;
      expect(fx.fake.stats.requests).toBe(3);
      // And no fourth claimed: three batches committing fill the reader's
      // room. Their 12 rows are settled; the other 8 wait, held by no one.
      const queue = await fx.database.db
        .selectFrom('embedding_queue')
        .select((eb) => [
          eb.fn.countAll<string>().as('n'),
          eb.fn.count<string>('claimed_by').as('claimed'),
        ])
        .executeTakeFirstOrThrow();
      expect({ n: Number(queue.n), claimed: Number(queue.claimed) }).toEqual({ n: 8, claimed: 0 });
      released.resolve();
      expect((await finished).summary).toMatchObject({ status: 'succeeded', embedded: 20 });
    },
  );

  it.each([
    [16, 4],
    [64, 8],
  ])(
    'reads ahead one batch for every 4 send slots, at most 8: at %i slots, %i',
    async (slots, ahead) => {
      // Claimed from the queue by the reader alone, so claims count its batches.
      await backfilledTarget(fx.database.db);
      await seedMessages(fx.database.db, sampleTexts(slots + ahead + 10));
      // Every request is held at the server: all slots sent, and the reader fills its room.
      const held = fx.fake.hold(() => true);
      const finished = makeRun(ctx(), { concurrency: String(slots), 'batch-size': '1' }).run.run();
      const claimedMessages = async () =>
        Number(
          (
            await fx.database.db
              .selectFrom('embedding_queue')
              .select((eb) => eb.fn.countAll<string>().as('n'))
              .where('claimed_by', 'is not', null)
              .executeTakeFirstOrThrow()
          ).n,
        );
      await waitFor(async () => held.held === slots && (await claimedMessages()) >= slots + ahead);
      // Sent and read ahead, claimed; then the reader waits.
      expect(await claimedMessages()).toBe(slots + ahead);
      expect(held.held).toBe(slots);
      held.release();
      expect((await finished).summary).toMatchObject({
        status: 'succeeded',
        embedded: slots + ahead + 10,
      });
    },
  );

  it('splits a batch into requests within the per-request input and token caps', async () => {
    const text = (i: number) => `item ${i} ${'alpha beta gamma '.repeat(5)}`;
    const contents = Array.from({ length: 8 }, (_, i) => text(i + 1));
    await seedMessages(fx.database.db, contents);
    const perInput = Math.max(...contents.map(tokenCount));
    await embed({ 'batch-size': '8', 'max-request-inputs': '3' });
    expect(fx.fake.stats.requestSizes).toEqual([3, 3, 2]);

    await sql`truncate message_embeddings, embedding_runs, embedding_targets, embedding_queue cascade`.execute(
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
    const total = contents.reduce((sum, text) => sum + tokenCount(text), 0);
    expect(total).toBeGreaterThan(10_000);
    Object.assign(fx.fake.options, { maxTpm: 60_000, maxTpmBurst: 10_000 });

    // Unpaced: no virtual time passes but what the 429s ask for, so more than
    // the burst sent at once must meet 429s, on any machine.
    virtualTime(fx.fake);
    const unpaced = await embed({ 'batch-size': '10' });
    expect(unpaced.summary).toMatchObject({ status: 'succeeded', embedded: 120 });
    expect(fx.fake.stats.rateLimited).toBeGreaterThan(0);
    expect(unpaced.summary.retries).toBe(fx.fake.stats.rateLimited);

    await sql`truncate message_embeddings, embedding_runs, embedding_targets, embedding_queue cascade`.execute(
      fx.database.db,
    );
    fx.fake.reset();
    // Paced: a full server bucket again, on a new virtual clock shared with the gate.
    const time = virtualTime(fx.fake);
    const paced = await embed({ 'batch-size': '10', 'max-tpm': '60000' });
    expect(paced.summary).toMatchObject({ status: 'succeeded', embedded: 120 });
    // The server, charging each request at the moment the gate let it through,
    // never had to refuse one.
    expect(fx.fake.stats.rateLimited).toBe(0);
    // The gate counted what the server counted...
    expect(time.admittedTokens()).toBe(fx.fake.stats.tokensEmbedded);
    // ...and held it back: past its 9,900-token burst, at 0.99 tokens a virtual ms.
    expect(time.now()).toBeGreaterThanOrEqual((time.admittedTokens() - 9_900) / 0.99);
  });
});
