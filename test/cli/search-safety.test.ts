import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readEmbeddingColumnType } from '../../src/db/embedding-column.js';
import type { EmbeddingColumnType } from '../../src/db/names.js';
import { searchIndexName } from '../../src/sql/index.js';
import { runCli, stderrLines } from '../support/cli.js';
import { backends, createTestDatabase, openMigrated, type TestDatabase } from '../support/db.js';
import { seedMessages } from '../support/embed-run.js';
import { type FakeOpenAI, startFakeOpenAI } from '../support/fake-openai.js';

// A terminal title change, a colour, an OSC 8 link, a right-to-left override,
// an 8-bit CSI, and a newline and tab.
const HOSTILE =
  'T \x1b]0;pwned\x07 \x1b[31mRED\x1b[0m \x1b]8;;https://evil.example\x1b\\link\x1b]8;;\x1b\\ a\u202egpj.exe \x9b2J\nnext\tline';
// What a terminal is shown of it: every control character escaped.
const HOSTILE_ESCAPED =
  'T \\x1b]0;pwned\\x07 \\x1b[31mRED\\x1b[0m \\x1b]8;;https://evil.example\\x1b\\link\\x1b]8;;\\x1b\\ a\\u202egpj.exe \\x9b2J\\x0anext\\x09line';
// A search hit's one-line preview (its first 100 characters, all of it here):
// whitespace runs (newline, tab) first become one space.
const HOSTILE_SHOWN = HOSTILE_ESCAPED.replace('\\x0anext\\x09line', ' next line');

/** Characters a terminal would act on rather than print, found in `text`. */
function rawControls(text: string): string[] {
  return Array.from(text).filter((c) => {
    const code = c.codePointAt(0) ?? 0;
    return (
      code < 0x20 ||
      (code >= 0x7f && code <= 0x9f) ||
      [0x061c, 0x200e, 0x200f, 0x2028, 0x2029].includes(code) ||
      (code >= 0x202a && code <= 0x202e) ||
      (code >= 0x2066 && code <= 0x2069)
    );
  });
}
const withoutNewlines = (text: string) => text.replaceAll('\n', '');

describe.each(backends())(
  'search and status on a terminal, and pgembed index, on %s',
  (backend) => {
    let database: TestDatabase;
    let fake: FakeOpenAI;
    let columnType: EmbeddingColumnType;
    const contents = [HOSTILE, 'a note about gardening', 'a note about cooking', 'plain text'];
    const env = () => ({ DATABASE_URL: database.url, OPENAI_BASE_URL: fake.url });

    beforeAll(async () => {
      database = await createTestDatabase(backend);
      fake = await startFakeOpenAI();
      const db = await openMigrated(database.url);
      try {
        columnType = await readEmbeddingColumnType(db.db);
        await seedMessages(db.db, contents);
        // A failed run whose error text came from somewhere hostile.
        await sql`insert into embedding_runs (provider, model, status, host, pid, error)
        values ('openai', 'text-embedding-3-small', 'failed', 'host', 1, ${HOSTILE})`.execute(
          db.db,
        );
      } finally {
        await db.close();
      }
      const embedded = await runCli('embed', [], env());
      expect(embedded.code, embedded.stderr).toBe(0);
      // The same model at 256 dimensions, under another provider label.
      const short = await runCli('embed', ['--provider', 'short', '--dimensions', '256'], env());
      expect(short.code, short.stderr).toBe(0);
    }, 120_000);
    afterAll(async () => {
      await fake?.close();
      await database?.drop();
    });

    it('shows message content with its control characters escaped; --json keeps the exact text', async () => {
      const text = await runCli('search', [HOSTILE, '-k', '2'], env());
      expect(text.code, text.stderr).toBe(0);
      expect(rawControls(withoutNewlines(text.stdout))).toEqual([]);
      const lines = text.stdout.split('\n');
      expect(lines[0]).toBe(
        `nearest to "${HOSTILE_ESCAPED}" (openai/text-embedding-3-small, 1536 dimensions, cosine):`,
      );
      expect(lines[1]).toBe(`  1. 1.000  message 1  ${HOSTILE_SHOWN}`);

      const json = await runCli('search', [HOSTILE, '-k', '2', '--json'], env());
      expect(json.code, json.stderr).toBe(0);
      const parsed = JSON.parse(json.stdout) as {
        query: string;
        hits: Array<{ messageId: string; content: string }>;
      };
      expect(parsed.query).toBe(HOSTILE);
      expect(parsed.hits[0]).toMatchObject({ messageId: '1', content: HOSTILE });
    }, 60_000);

    it('shows error texts from the database escaped in status', async () => {
      const text = await runCli('status', [], { DATABASE_URL: database.url });
      expect(text.code, text.stderr).toBe(0);
      expect(rawControls(withoutNewlines(text.stdout))).toEqual([]);
      expect(text.stdout).toContain(`      error: ${HOSTILE_ESCAPED}\n`);
    }, 60_000);

    it('says in one line which --dimensions the model was embedded at', async () => {
      const result = await runCli('search', ['gardening', '--provider', 'short'], env());
      expect(result.code).toBe(1);
      expect(stderrLines(result)).toEqual([
        'pgembed: no embeddings of short/text-embedding-3-small at 1536 dimensions; it has 256: pass --dimensions 256',
      ]);
      expect(result.stdout).toBe('');
      const found = await runCli(
        'search',
        [contents[1] as string, '--provider', 'short', '--dimensions', '256', '--json'],
        env(),
      );
      expect(found.code, found.stderr).toBe(0);
      const { hits } = JSON.parse(found.stdout) as { hits: Array<{ messageId: string }> };
      expect(hits[0]?.messageId).toBe('2');
    }, 60_000);

    it('creates the search index once, named from provider, model and dimensions; refuses real[] in one line', async () => {
      const first = await runCli('index', [], env());
      if (columnType === 'real[]') {
        expect(first.code).toBe(1);
        expect(stderrLines(first)).toHaveLength(1);
        expect(first.stderr).toMatch(
          /^pgembed: message_embeddings\.embedding is real\[\] \(this server has no pgvector\), which HNSW cannot index: search still works/,
        );
        return;
      }
      const name = searchIndexName('openai', 'text-embedding-3-small', 1536);
      expect(first.code, first.stderr).toBe(0);
      expect(first.stdout).toBe(
        `created index ${name} for openai/text-embedding-3-small at 1536 dimensions (4 rows, hnsw on embedding::vector(1536), cosine)\n`,
      );
      const second = await runCli('index', [], env());
      expect(second.code, second.stderr).toBe(0);
      expect(second.stdout).toBe(
        `index ${name} already exists for openai/text-embedding-3-small at 1536 dimensions (4 rows, hnsw on embedding::vector(1536), cosine): nothing to do\n`,
      );
      const short = await runCli('index', ['--provider', 'short'], env());
      expect(short.code, short.stderr).toBe(0);
      expect(short.stdout).toBe(
        `created index ${searchIndexName('short', 'text-embedding-3-small', 256)} for short/text-embedding-3-small at 256 dimensions (4 rows, hnsw on embedding::vector(256), cosine); search with --dimensions 256\n`,
      );
      const searched = await runCli('search', [contents[2] as string, '-k', '1', '--json'], env());
      expect(searched.code, searched.stderr).toBe(0);
      expect((JSON.parse(searched.stdout) as { hits: Array<{ messageId: string }> }).hits).toEqual([
        expect.objectContaining({ messageId: '3' }),
      ]);
    }, 60_000);
  },
);
