import { createHash } from 'node:crypto';
import { isWithinTokenLimit } from 'gpt-tokenizer/encoding/cl100k_base';
import type { Kysely } from 'kysely';
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openDatabase } from '../../src/db/connect.js';
import type { DB } from '../../src/db/schema.js';
import { parseVector } from '../../src/db/vector.js';
import { spamAssassin } from '../../src/seed/sources.js';
import { runCli, stderrLines } from '../support/cli.js';
import { type BackendName, createTestDatabase, type TestDatabase } from '../support/db.js';
import { type FakeOpenAI, fakeEmbedding, startFakeOpenAI } from '../support/fake-openai.js';

const LIMIT = 8192;
// A 6,000-email run takes ~40 s on PGlite alone, more with the other file's
// run sharing two cores. The child is killed at CHILD_TIMEOUT_MS, before the
// test's own timeout, so a slow run fails here instead of leaking into the next test.
const CHILD_TIMEOUT_MS = 240_000;
const TEST_TIMEOUT_MS = 300_000;
const PLAIN = { disallowedSpecial: new Set<string>() };

/**
 * The end-to-end scenarios on the real SpamAssassin corpus, through
 * the real CLI processes, on one backend. One file per backend so the two run
 * in parallel.
 */
export function corpusScenarios(backend: BackendName) {
  const corpus = [...spamAssassin(6000)];
  // The oracle, independent of the worker: which emails exceed the limit.
  const overLimit = corpus
    .filter((m) => isWithinTokenLimit(m.content, LIMIT, PLAIN) === false)
    .map((m) => m.id);

  let fake: FakeOpenAI;
  beforeAll(async () => {
    fake = await startFakeOpenAI();
  });
  afterAll(async () => {
    await fake?.close();
  });

  async function withDb<T>(url: string, fn: (db: Kysely<DB>) => Promise<T>): Promise<T> {
    // PGlite's directory belongs to one process at a time: open between CLI runs only.
    const database = await openDatabase(url);
    try {
      return await fn(database.db);
    } finally {
      await database.close();
    }
  }
  const embed = (url: string, args: string[]) =>
    runCli(
      'embed',
      ['--limit', '6000', '--batch-size', '8', ...args],
      {
        DATABASE_URL: url,
        OPENAI_BASE_URL: fake.url,
        LOG_LEVEL: 'warn',
      },
      { timeoutMs: CHILD_TIMEOUT_MS },
    );
  const rowDigest = (db: Kysely<DB>) =>
    db
      .selectFrom('message_embeddings')
      .select([
        sql<string>`message_id::text`.as('id'),
        sql<string>`embedded_at::text`.as('at'),
        sql<string>`encode(content_sha256, 'hex')`.as('sha'),
      ])
      .orderBy('message_id')
      .execute();

  describe(`the SpamAssassin corpus on ${backend}`, { timeout: TEST_TIMEOUT_MS }, () => {
    it('has 179 emails over the limit among its first 6,000, the first being the 166th', () => {
      expect(corpus).toHaveLength(6000);
      expect(overLimit).toHaveLength(179);
      expect(overLimit[0]).toBe('166');
    });

    describe('in partial mode', () => {
      let target: TestDatabase;
      beforeAll(async () => {
        target = await createTestDatabase(backend);
        const seeded = await runCli(
          'seed',
          ['--corpus', 'spamassassin', '--limit', '6000'],
          {
            DATABASE_URL: target.url,
          },
          { timeoutMs: CHILD_TIMEOUT_MS },
        );
        expect(seeded.code, seeded.stderr).toBe(0);
      });
      afterAll(async () => {
        await target?.drop();
      });

      it('embeds every eligible message except those over the limit, which are exactly the skips, and exits 2', async () => {
        fake.reset();
        const result = await embed(target.url, ['--allow-partial']);
        expect(result.code, result.stderr).toBe(2);
        expect(result.stderr).toMatch(/run \d+ partial/);
        expect(result.stderr).toMatch(/skipped context_length: 179 \(ids 166, 265, 570,/);
        expect(result.stderr).toMatch(
          /select message_id, reason, detail from embedding_skips where run_id = \d+/,
        );

        await withDb(target.url, async (db) => {
          const ids = (await rowDigest(db)).map((r) => r.id);
          const expected = corpus.map((m) => m.id).filter((id) => !overLimit.includes(id));
          expect(ids).toEqual(expected);
          const skips = await db
            .selectFrom('embedding_skips')
            .select(['message_id', 'reason'])
            .orderBy('message_id')
            .execute();
          expect(skips.map((s) => s.message_id)).toEqual(overLimit);
          expect(new Set(skips.map((s) => s.reason))).toEqual(new Set(['context_length']));
          const run = await db.selectFrom('embedding_runs').selectAll().executeTakeFirstOrThrow();
          expect(run).toMatchObject({
            status: 'partial',
            embedded: 5821,
            skipped: 179,
            planned: 6000,
          });
          // Stored vectors are the provider's for their own message.
          const sample = await db
            .selectFrom('message_embeddings')
            .select([
              sql<string>`message_id::text`.as('id'),
              sql<string>`embedding::text`.as('embedding'),
            ])
            .where(sql<boolean>`message_id % 97 = 0`)
            .execute();
          expect(sample.length).toBeGreaterThan(50);
          for (const row of sample) {
            const content = corpus[Number(row.id) - 1]?.content as string;
            expect(parseVector(row.embedding).map(Math.fround)).toEqual(
              Array.from(fakeEmbedding(content, 1536)),
            );
          }
        });
        // The provider saw each embedded email once and never one over the limit.
        expect(fake.stats.inputsEmbedded).toBe(5821);
        expect([...fake.stats.seen.values()].every((n) => n === 1)).toBe(true);
      });

      it('sends nothing to the provider on a rerun and changes none of the rows', async () => {
        const before = await withDb(target.url, rowDigest);
        fake.reset();
        const result = await embed(target.url, ['--allow-partial']);
        expect(result.code, result.stderr).toBe(2);
        expect(fake.stats.requests).toBe(0);
        expect(await withDb(target.url, rowDigest)).toEqual(before);
      });

      it('re-embeds exactly the one message whose content was edited', async () => {
        const edited = 'An edited email body.';
        const before = await withDb(target.url, async (db) => {
          await db
            .updateTable('messages')
            .set({ content: edited })
            .where('id', '=', '10')
            .execute();
          return rowDigest(db);
        });
        fake.reset();
        const result = await embed(target.url, ['--allow-partial']);
        expect(result.code, result.stderr).toBe(2);
        expect([...fake.stats.seen.keys()]).toEqual([edited]);
        const after = await withDb(target.url, rowDigest);
        const changed = after.filter((row, i) => JSON.stringify(row) !== JSON.stringify(before[i]));
        expect(changed.map((r) => r.id)).toEqual(['10']);
        expect(changed[0]?.sha).toBe(createHash('sha256').update(edited).digest('hex'));
      });
    });

    describe('in strict mode', () => {
      let target: TestDatabase;
      beforeAll(async () => {
        target = await createTestDatabase(backend);
        const seeded = await runCli('seed', ['--corpus', 'spamassassin', '--limit', '400'], {
          DATABASE_URL: target.url,
        });
        expect(seeded.code, seeded.stderr).toBe(0);
      });
      afterAll(async () => {
        await target?.drop();
      });

      it('stops at the 166th message with exit 1, naming it, its tokens and the limit, after committing the 165 before it', async () => {
        fake.reset();
        const result = await embed(target.url, []);
        expect(result.code).toBe(1);
        const last = stderrLines(result).at(-1) ?? '';
        expect(last).toMatch(
          /^pgembed: message 166 cannot be embedded \(context_length\): \d+ tokens, over the 8192-token limit/,
        );
        expect(last).toContain('--allow-partial');
        await withDb(target.url, async (db) => {
          const ids = (await rowDigest(db)).map((r) => Number(r.id));
          expect(ids).toEqual(Array.from({ length: 165 }, (_, i) => i + 1));
          const run = await db.selectFrom('embedding_runs').selectAll().executeTakeFirstOrThrow();
          expect(run).toMatchObject({ status: 'failed', embedded: 165 });
        });
      });

      it('picks up from there with --allow-partial without re-embedding the 165', async () => {
        const seenBefore = new Map(fake.stats.seen);
        const result = await embed(target.url, ['--allow-partial']);
        expect(result.code, result.stderr).toBe(2);
        for (const m of corpus.slice(0, 165))
          expect(fake.stats.seen.get(m.content)).toBe(seenBefore.get(m.content));
        await withDb(target.url, async (db) => {
          const count = await db
            .selectFrom('message_embeddings')
            .select(sql<number>`count(*)::int`.as('n'))
            .executeTakeFirstOrThrow();
          expect(count.n).toBe(400 - overLimit.filter((id) => Number(id) <= 400).length);
        });
      });
    });
  });
}
