import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openDatabase } from '../../src/db/connect.js';
import { runCli, stderrLines } from '../support/cli.js';

const LONG = 'lorem ipsum dolor sit amet '.repeat(1200); // ~6,000 tokens, over the 2,048 limit

describe('embedding with the bundled local model', () => {
  let scratch: string;
  let url: string;
  beforeAll(async () => {
    scratch = mkdtempSync(join(tmpdir(), 'pgembed-local-'));
    url = `pglite:${join(scratch, 'db')}`;
    const jsonl = join(scratch, 'messages.jsonl');
    const lines = Array.from({ length: 12 }, (_, i) =>
      JSON.stringify({ id: i + 1, content: i === 7 ? LONG : `note ${i + 1} about the garden` }),
    );
    writeFileSync(jsonl, `${lines.join('\n')}\n`);
    const seeded = await runCli('seed', ['--jsonl', jsonl], { DATABASE_URL: url });
    expect(seeded.code, seeded.stderr).toBe(0);
  }, 60_000);
  afterAll(() => rmSync(scratch, { recursive: true, force: true }));

  it('is used when no OpenAI key or URL is set, says so first, and applies its input limit strictly', async () => {
    const result = await runCli('embed', ['--batch-size', '4'], {
      DATABASE_URL: url,
      LOG_LEVEL: 'info',
    });
    const first = JSON.parse(result.stdout.split('\n')[0] ?? '{}') as { msg?: string };
    expect(first.msg).toMatch(
      /^neither OPENAI_API_KEY nor OPENAI_BASE_URL is set: embedding offline/,
    );
    expect(result.code).toBe(1);
    expect(stderrLines(result).at(-1)).toMatch(
      /^pgembed: message 8 cannot be embedded \(context_length\): \d+ tokens, over the 2048-token limit/,
    );
  }, 60_000);

  it('skips the over-long input in partial mode and stores 512-dimension vectors labelled local', async () => {
    const result = await runCli('embed', ['--allow-partial', '--batch-size', '4'], {
      DATABASE_URL: url,
    });
    expect(result.code, result.stderr).toBe(2);
    const database = await openDatabase(url);
    try {
      const rows = await sql<{ provider: string; model: string; dimensions: number; n: number }>`
        select provider, model, dimensions, count(*)::int as n from message_embeddings
        group by 1, 2, 3`.execute(database.db);
      expect(rows.rows).toEqual([
        { provider: 'local', model: 'universal-sentence-encoder-lite', dimensions: 512, n: 11 },
      ]);
      const skips = await database.db
        .selectFrom('embedding_skips')
        .select(['message_id', 'reason'])
        .execute();
      expect(skips).toEqual([{ message_id: '8', reason: 'context_length' }]);
    } finally {
      await database.close();
    }
  }, 60_000);
});
