import { readFileSync } from 'node:fs';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type ColumnUpdateNode, sql } from 'kysely';
import { describe, expect, it } from 'vitest';
import { buildEmbedConfig, type FlagValues } from '../../src/config.js';
import { createLogger } from '../../src/log.js';
import type { EmbeddingProvider, EmbedResult } from '../../src/provider/client.js';
import { openAIProviderFor } from '../../src/provider/create.js';
import { EmbedRun } from '../../src/worker/run.js';
import { backends } from '../support/db.js';
import { deferred } from '../support/deferred.js';
import { sampleTexts, seedMessages, useWorkerFixture } from '../support/embed-run.js';
import { queryHook } from '../support/query-hook.js';

/**
 * What a run was billed (every answer the provider sent) against what it kept
 * (what it committed), and that nothing is sent once the run knows it stops.
 * The fake server counts every request it receives and the tokens of every
 * answer it gives; a wrapper around the real provider (the openai SDK over
 * HTTP) holds answers or errors on their way back, so the order of events is
 * fixed by the test, never by timing.
 */

// Over the fake server's 50-token limit below; the model is unknown to
// pgembed, so only the provider's answer tells (a 400 naming the input).
const LONG = 'long '.repeat(80);

interface Call {
  inputs: string[];
  /** Sends the request (the real SDK, over HTTP) and returns its answer. */
  send: () => Promise<EmbedResult>;
}

/**
 * Resolves once a heartbeat carrying the billed spend has been written: an
 * update of embedding_runs.tokens_billed that is not the run's end (no status).
 */
class HeartbeatWatch {
  #waiting: Array<() => void> = [];
  readonly plugin = queryHook(
    (node) => {
      if (node.kind !== 'UpdateQueryNode') return false;
      const columns = (node.updates ?? []).map(
        (u: ColumnUpdateNode) => (u.column as { column?: { name?: string } }).column?.name,
      );
      return columns.includes('tokens_billed') && !columns.includes('status');
    },
    async (result) => {
      const waiting = this.#waiting;
      this.#waiting = [];
      for (const resolve of waiting) resolve();
      return result;
    },
  );

  next(): Promise<void> {
    return new Promise((resolve) => this.#waiting.push(resolve));
  }
}

describe.each(backends())('billed and kept spend on %s', (backend) => {
  const fx = useWorkerFixture(backend);
  const texts = sampleTexts;

  /** An EmbedRun wired as the CLI wires it, with `around` between the pipeline and the provider. */
  function watchedRun(
    flags: FlagValues,
    around: (call: Call) => Promise<EmbedResult>,
    extra: { heartbeats?: HeartbeatWatch; progressIntervalMs?: number } = {},
  ) {
    const { db, committer, baseUrl } = fx.ctx();
    const config = buildEmbedConfig(
      { 'batch-size': '2', 'max-retry-wait-ms': '20', ...flags },
      { OPENAI_BASE_URL: baseUrl },
    );
    const real = openAIProviderFor(config);
    const provider: EmbeddingProvider = {
      get expectedDimensions() {
        return real.expectedDimensions;
      },
      embed: (inputs) => around({ inputs, send: () => real.embed(inputs) }),
    };
    const reports: string[] = [];
    const run = new EmbedRun({
      db: extra.heartbeats ? db.withPlugin(extra.heartbeats.plugin) : db,
      committer,
      provider,
      config,
      logger: createLogger('silent'),
      report: (text) => reports.push(text),
      progressIntervalMs: extra.progressIntervalMs,
    });
    return { run, reports };
  }

  /** What the run committed, as the tables hold it. */
  async function keptInDatabase(runId: string) {
    const { rows } = await sql<{
      rows: number;
      input_tokens: number;
      batches: number;
      batch_tokens: number;
      attempts: number;
    }>`
      select (select count(*) from message_embeddings where run_id = ${runId})::int as rows,
        (select coalesce(sum(input_tokens), 0) from message_embeddings where run_id = ${runId})::int
          as input_tokens,
        (select count(*) from embedding_batches where run_id = ${runId})::int as batches,
        (select coalesce(sum(tokens), 0) from embedding_batches where run_id = ${runId})::int
          as batch_tokens,
        (select coalesce(sum(attempts), 0) from embedding_batches where run_id = ${runId})::int
          as attempts`.execute(fx.database.db);
    return rows[0] as NonNullable<(typeof rows)[0]>;
  }

  async function runRow(runId: string) {
    return fx.database.db
      .selectFrom('embedding_runs')
      .selectAll()
      .where('id', '=', runId)
      .executeTakeFirstOrThrow();
  }

  async function storedIds() {
    const rows = await fx.database.db
      .selectFrom('message_embeddings')
      .select('message_id')
      .orderBy('message_id')
      .execute();
    return rows.map((r) => r.message_id);
  }

  it('strict mode: once the provider names a culprit, no other request starts, and the answer it then throws away is billed, not kept', async () => {
    Object.assign(fx.fake.options, { maxInputTokens: 50, models: ['my-local-model'] });
    const contents = texts(10);
    contents[1] = LONG; // message 2, second in the first batch
    await seedMessages(fx.database.db, contents);
    const manifest = join(await mkdtemp(join(tmpdir(), 'pgembed-spend-')), 'run.json');

    // Batches of 2, two in flight: [1, 2] goes out once [3, 4] has been
    // answered by the server, and [5, 6] waits for a slot.
    const secondBatchAnswered = deferred();
    const secondBatchMayAnswer = deferred();
    let requestsAtCulpritAnswer: number | undefined;
    const startedAfterCulpritAnswer: string[][] = [];
    let refused = 0;
    const { run, reports } = watchedRun(
      { model: 'my-local-model', concurrency: '2', manifest },
      async ({ inputs, send }) => {
        if (requestsAtCulpritAnswer !== undefined) startedAfterCulpritAnswer.push(inputs);
        if (inputs.includes(contents[2] as string)) {
          // The second batch is answered by the server, but its answer reaches
          // the run only once the culprit's answer is in: it stays in flight.
          const answer = await send();
          secondBatchAnswered.resolve();
          await secondBatchMayAnswer.promise;
          return answer;
        }
        if (inputs.includes(LONG)) await secondBatchAnswered.promise;
        try {
          const answer = await send();
          // The first answer after the culprit's (message 1, its batch-mate before it).
          if (requestsAtCulpritAnswer !== undefined) secondBatchMayAnswer.resolve();
          return answer;
        } catch (error) {
          refused++;
          if (inputs.includes(LONG)) requestsAtCulpritAnswer = fx.fake.stats.requests;
          throw error;
        }
      },
    );
    const outcome = await run.run();

    expect(outcome.exitCode).toBe(1);
    expect(outcome.error?.message).toMatch(/^message 2 cannot be embedded \(context_length\)/);
    expect(requestsAtCulpritAnswer).toBe(2);
    // After the culprit's answer, the only request is message 1 on its own:
    // the batch-mate before the culprit, which the run keeps. Neither message
    // 4's batch-mate nor the waiting batch [5, 6] is sent.
    expect(startedAfterCulpritAnswer).toEqual([[contents[0]]]);
    expect(fx.fake.stats.requests).toBe(3);
    for (const text of contents.slice(4)) expect(fx.fake.stats.seen.has(text)).toBe(false);

    const { summary } = outcome;
    // Billed: every answer the server gave ([3, 4], then [1]), kept or not.
    expect(summary.requestsBilled).toBe(fx.fake.stats.requests - refused);
    expect(summary.requestsBilled).toBe(2);
    expect(summary.tokensBilled).toBe(fx.fake.stats.tokensEmbedded);
    // Kept: message 1 only; [3, 4] was paid for and thrown away.
    expect(await storedIds()).toEqual(['1']);
    const kept = await keptInDatabase(summary.runId);
    expect(summary).toMatchObject({
      embedded: kept.rows,
      tokens: kept.input_tokens,
      batches: kept.batches,
      requests: kept.attempts,
    });
    expect(kept.batch_tokens).toBe(kept.input_tokens);
    expect(summary.tokensBilled).toBeGreaterThan(summary.tokens);

    const row = await runRow(summary.runId);
    expect(Number(row.tokens_billed)).toBe(summary.tokensBilled);
    expect(row.requests_billed).toBe(summary.requestsBilled);
    expect(Number(row.tokens)).toBe(summary.tokens);
    expect(row.summary).toMatchObject({
      tokensBilled: summary.tokensBilled,
      requestsBilled: summary.requestsBilled,
    });
    const view = await sql<{ tokens_billed: string; requests_billed: number }>`
      select tokens_billed, requests_billed from embedding_progress
      where run_id = ${summary.runId}`.execute(fx.database.db);
    expect(view.rows[0]).toEqual({
      tokens_billed: String(summary.tokensBilled),
      requests_billed: 2,
    });
    expect(JSON.parse(readFileSync(manifest, 'utf8'))).toMatchObject({
      tokensBilled: summary.tokensBilled,
      requestsBilled: 2,
      tokens: summary.tokens,
    });
    expect(reports[0]).toContain(`kept: tokens ${summary.tokens}, requests ${summary.requests}`);
    expect(reports[0]).toContain(`billed: tokens ${summary.tokensBilled} in 2 answered requests`);
  });

  it('strict mode: a culprit found in one part of a split batch stops the parts after it', async () => {
    Object.assign(fx.fake.options, { maxInputTokens: 50, models: ['my-local-model'] });
    const contents = texts(6);
    contents[2] = LONG; // message 3: first of the second part
    await seedMessages(fx.database.db, contents);
    const { run } = watchedRun(
      {
        model: 'my-local-model',
        concurrency: '1',
        'batch-size': '6',
        'max-request-inputs': '2',
      },
      ({ send }) => send(),
    );
    const outcome = await run.run();
    expect(outcome.exitCode).toBe(1);
    expect(outcome.error?.message).toMatch(/^message 3 cannot be embedded \(context_length\)/);
    // [1, 2] answered, [3, 4] refused for message 3; neither [4] nor [5, 6] is sent.
    expect(fx.fake.stats.requestSizes).toEqual([2, 2]);
    expect(await storedIds()).toEqual(['1', '2']);
    expect(outcome.summary).toMatchObject({
      requestsBilled: 1,
      tokensBilled: fx.fake.stats.tokensEmbedded,
      embedded: 2,
      tokens: fx.fake.stats.tokensEmbedded,
    });
  });

  it('a fatal provider error stops a retry another batch had waiting, even in partial mode', async () => {
    const contents = texts(8);
    contents[0] = `alpha ${contents[0]}`; // batch [1, 2]: the quota runs out
    contents[2] = `bravo ${contents[2]}`; // batch [3, 4]: a 429, to be retried
    await seedMessages(fx.database.db, contents);
    fx.fake.failWhenInputContains('alpha', { kind: 'insufficient-quota' });
    fx.fake.failWhenInputContains('bravo', { kind: 'rate-limit', retryAfterMs: 1 });

    const rateLimited = deferred();
    const fatalAnswered = deferred();
    let requestsAtFatalAnswer: number | undefined;
    const startedAfterFatalAnswer: string[][] = [];
    const { run } = watchedRun(
      { concurrency: '2', 'allow-partial': true },
      async ({ inputs, send }) => {
        if (requestsAtFatalAnswer !== undefined) startedAfterFatalAnswer.push(inputs);
        const fatal = inputs.some((t) => t.startsWith('alpha'));
        // [1, 2] goes out once [3, 4] has had its 429.
        if (fatal) await rateLimited.promise;
        try {
          return await send();
        } catch (error) {
          if (fatal) {
            requestsAtFatalAnswer = fx.fake.stats.requests;
            fatalAnswered.resolve();
          } else {
            rateLimited.resolve();
            // The 429 reaches the retry owner only after the fatal answer is in.
            await fatalAnswered.promise;
          }
          throw error;
        }
      },
    );
    const outcome = await run.run();
    expect(outcome.exitCode).toBe(1);
    expect(outcome.error?.message).toMatch(/quota/);
    expect(requestsAtFatalAnswer).toBe(2);
    expect(startedAfterFatalAnswer).toEqual([]);
    expect(fx.fake.stats.requests).toBe(2);
    expect(outcome.summary).toMatchObject({ requestsBilled: 0, tokensBilled: 0, embedded: 0 });
    expect(Number((await runRow(outcome.summary.runId)).tokens_billed)).toBe(0);
  });

  it('strict mode: a fatal provider error is not replaced by a culprit found after it in an earlier batch, and nothing is sent after it', async () => {
    Object.assign(fx.fake.options, { maxInputTokens: 50, models: ['my-local-model'] });
    const contents = texts(8);
    contents[2] = LONG; // batch 2 [3, 4]: message 3 is the culprit
    contents[4] = `alpha ${contents[4]}`; // batch 3 [5, 6]: the quota runs out
    await seedMessages(fx.database.db, contents);
    fx.fake.failWhenInputContains('alpha', { kind: 'insufficient-quota' });

    // Batches of 2, three in flight. The server answers, in this order:
    // [1, 2] a 429 (held on its way back, so its retry comes last), [5, 6]
    // the fatal quota error, [3, 4] the 400 naming message 3. Only then does
    // the 429 reach the retry owner of batch 1, which sits before the culprit.
    const rateLimited = deferred();
    const fatalAnswered = deferred();
    const culpritAnswered = deferred();
    let firstBatchCalls = 0;
    let requestsAtFatalAnswer: number | undefined;
    const startedAfterFatalAnswer: string[][] = [];
    const { run } = watchedRun(
      { model: 'my-local-model', concurrency: '3' },
      async ({ inputs, send }) => {
        if (requestsAtFatalAnswer !== undefined) startedAfterFatalAnswer.push(inputs);
        if (inputs.includes(contents[0] as string) && ++firstBatchCalls === 1) {
          // The only request at the server now: the queued 429 is its own.
          fx.fake.enqueueFault({ kind: 'rate-limit', retryAfterMs: 1 });
          try {
            return await send();
          } catch (error) {
            rateLimited.resolve();
            await culpritAnswered.promise;
            throw error;
          }
        }
        if (inputs.some((t) => t.startsWith('alpha'))) {
          await rateLimited.promise;
          try {
            return await send();
          } catch (error) {
            requestsAtFatalAnswer = fx.fake.stats.requests;
            fatalAnswered.resolve();
            throw error;
          }
        }
        if (inputs.includes(LONG)) {
          await fatalAnswered.promise;
          try {
            return await send();
          } finally {
            culpritAnswered.resolve();
          }
        }
        return send();
      },
    );
    const outcome = await run.run();

    expect(requestsAtFatalAnswer).toBe(2);
    // Batch 1 precedes the culprit, but the quota error stops everything:
    // its retry is never sent, nor is anything else.
    expect(startedAfterFatalAnswer).toEqual([]);
    expect(firstBatchCalls).toBe(1);
    expect(fx.fake.stats.requests).toBe(3);
    // The run reports the quota, not the culprit found after it.
    expect(outcome.exitCode).toBe(1);
    expect(outcome.error?.message).toMatch(/quota/);
    expect(outcome.summary.error).toMatch(/quota/);
    expect(fx.fake.stats.seen.has(contents[0] as string)).toBe(false);
    // Nothing answered, so nothing billed and nothing kept.
    expect(outcome.summary).toMatchObject({ requestsBilled: 0, tokensBilled: 0, embedded: 0 });
    expect(await storedIds()).toEqual([]);
    const row = await runRow(outcome.summary.runId);
    expect(row.status).toBe('failed');
    expect(row.error).toMatch(/quota/);
  });

  it('an interrupted run reports what it was billed, with its heartbeat and at the end, though a claim taken over threw an answer away', async () => {
    const contents = texts(12);
    await seedMessages(fx.database.db, contents);
    // Batches of 2, each with its own claims.
    const heartbeats = new HeartbeatWatch();
    const release = deferred();
    let held = 0;
    const twoHeld = deferred();
    let firstAnswerTokens: number | undefined;
    const { run } = watchedRun(
      { concurrency: '2', 'batch-size': '2' },
      async ({ inputs, send }) => {
        const answer = await send();
        if (inputs.includes(contents[0] as string)) {
          firstAnswerTokens = answer.promptTokens;
          return answer;
        }
        // Every later answer waits: [3, 4] and [5, 6] stay in flight.
        held++;
        if (held === 2) twoHeld.resolve();
        await release.promise;
        return answer;
      },
      { heartbeats, progressIntervalMs: 20 },
    );
    const finished = run.run();
    await twoHeld.promise;

    // While the run goes on, the heartbeat writes what it was billed so far:
    // [1, 2] only, since the other two answers have not reached it.
    await heartbeats.next();
    const running = await fx.database.db
      .selectFrom('embedding_runs')
      .selectAll()
      .where('status', '=', 'running')
      .executeTakeFirstOrThrow();
    expect(running.requests_billed).toBe(1);
    expect(firstAnswerTokens).toBeGreaterThan(0);
    expect(Number(running.tokens_billed)).toBe(firstAnswerTokens);

    // Another worker takes over the claims of [3, 4] (as if this run had
    // stopped beating); then the run is stopped.
    await sql`
      update embedding_queue set claimed_by = claimed_by + 1000000
      where claimed_by = ${running.id} and message_id in (3, 4)`.execute(fx.database.db);
    run.stop('SIGINT');
    release.resolve();
    const outcome = await finished;

    expect(outcome.exitCode).toBe(130);
    const { summary } = outcome;
    expect(summary.status).toBe('interrupted');
    // Billed: the three answers the server gave; nothing was refused.
    expect(fx.fake.stats.requests).toBe(3);
    expect(summary.requestsBilled).toBe(fx.fake.stats.requests);
    expect(summary.tokensBilled).toBe(fx.fake.stats.tokensEmbedded);
    // Kept: [1, 2] and [5, 6]; the answer for [3, 4] could not be committed.
    expect(await storedIds()).toEqual(['1', '2', '5', '6']);
    const kept = await keptInDatabase(summary.runId);
    expect(summary).toMatchObject({
      embedded: kept.rows,
      tokens: kept.input_tokens,
      batches: kept.batches,
      requests: kept.attempts,
    });
    expect(summary.tokensBilled).toBeGreaterThan(summary.tokens);
    const row = await runRow(summary.runId);
    expect(row.status).toBe('interrupted');
    expect(Number(row.tokens_billed)).toBe(summary.tokensBilled);
    expect(row.requests_billed).toBe(3);
    expect(row.requests).toBe(2);
  });
});
